"""fedapp: federated learning on Flower with differential privacy and secure aggregation."""

__version__ = "0.1.0"
