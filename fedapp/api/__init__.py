"""The control plane: `fedapp serve`, its API, dashboard and metrics."""
