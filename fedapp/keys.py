"""Paillier key command: deal the federation's keys outside every federated process.

    python -m fedapp.keys deal --dir keys/fed --clients 10 --threshold 2 --min-contributors 10 [--bits 2048]
    python -m fedapp.keys generate --dir keys/clients [--public-dir keys/server] [--bits 2048]
    python -m fedapp.keys show --dir keys/clients
    python -m fedapp.keys pool --dir keys/clients --pool-dir pools --rounds 20 [--partitions 0,3] \
        [--workers 2] [hydra overrides of the experiment, e.g. +experiment=secagg_mnist]

``deal`` (the default for every privacy mode) makes a threshold key: each client
gets one key share (any ``--threshold`` of them decrypt), an Ed25519 key to sign
its contributions and its own decryption policy (``--min-contributors``); the
dealer then forgets the private key (:mod:`fedapp.crypto.dealing` lists the
files and who gets which). ``generate`` is the legacy single-key mode, in which
every client holds the whole private key: it writes the public and the private
key file (0600) to ``--dir``,
which is distributed to the clients only, and the public key alone to
``--public-dir`` for the server. In a simulation, run it before starting the
run; the ServerApp loads only the public key file.
"""

from __future__ import annotations

import argparse
import sys

from fedapp.crypto import (
    DEFAULT_KEY_BITS,
    PRIVATE_KEY_FILE,
    generate_keypair,
    load_private_key,
    load_public_key,
    save_keypair,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedapp.keys", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="new key pair for the clients (+ public key for the server)")
    gen.add_argument("--dir", required=True, help="clients' key directory (public + private)")
    gen.add_argument("--public-dir", default="", help="server's key directory (public key only)")
    gen.add_argument("--bits", type=int, default=DEFAULT_KEY_BITS)
    gen.add_argument("--force", action="store_true", help="replace an existing key pair")
    deal = sub.add_parser("deal", help="threshold key shares, signing keys and policies for every client")
    deal.add_argument("--dir", required=True, help="key directory (public files + one party-<id>/ per client)")
    deal.add_argument("--clients", type=int, required=True, help="number of clients (key shares)")
    deal.add_argument("--threshold", type=int, default=2, help="key shares needed to decrypt (t)")
    deal.add_argument("--min-contributors", type=int, default=0,
                      help="signed updates a sum needs, each client's policy (default: threshold + 1, the least allowed)")
    deal.add_argument("--bits", type=int, default=DEFAULT_KEY_BITS)
    deal.add_argument("--force", action="store_true", help="replace existing keys")
    show = sub.add_parser("show", help="key id and size of the key in --dir")
    show.add_argument("--dir", required=True)
    pool = sub.add_parser("pool", help="precompute the clients' obfuscators for the next rounds (offline phase)")
    pool.add_argument("--dir", required=True, help="clients' key directory (the private key is needed)")
    pool.add_argument("--pool-dir", required=True, help="where the pools go (the clients' secagg.pool_dir)")
    pool.add_argument("--rounds", type=int, required=True, help="rounds to precompute for")
    pool.add_argument("--partitions", default="", help="client ids, e.g. '0,3' (default: every client)")
    pool.add_argument("--workers", type=int, default=1, help="processes to spread the work over")
    pool.add_argument("overrides", nargs="*", help="Hydra overrides naming the experiment (model, layout, clients)")
    audit = sub.add_parser("audit", help="the operator's Ed25519 key that signs every run's audit-log head")
    audit.add_argument("--dir", required=True, help="where audit_ed25519.pem (private, 0600) and .pub go")
    audit.add_argument("--force", action="store_true", help="replace an existing key")
    args = parser.parse_args(argv)

    if args.command == "audit":
        return audit_key(args)
    if args.command == "generate":
        from pathlib import Path

        if (Path(args.dir) / PRIVATE_KEY_FILE).exists() and not args.force:
            print(f"{args.dir} already holds a private key; pass --force to replace it", file=sys.stderr)
            return 1
        public_key, private_key = generate_keypair(args.bits)
        save_keypair(args.dir, public_key, private_key)
        if args.public_dir:
            save_keypair(args.public_dir, public_key)
        print(f"key {public_key.key_id} ({public_key.bits} bits): clients {args.dir}, server {args.public_dir or '-'}")
        return 0
    if args.command == "deal":
        return deal_keys(args)
    if args.command == "pool":
        return make_pools(args)
    key = load_public_key(args.dir)
    print(f"key {key.key_id} ({key.bits} bits)")
    return 0


def audit_key(args: argparse.Namespace) -> int:
    """Make the audit signing key; refusing to overwrite one is a user mistake (exit 2)."""
    from fedapp.store.audit import AuditError, generate_audit_key

    try:
        private, public = generate_audit_key(args.dir, overwrite=args.force)
    except AuditError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"audit key: {private} (keep it on the server host; set store.audit_key to it), public key: {public} "
          "(give it to whoever verifies: fedapp audit verify RUN --public-key ...)")
    return 0


def deal_keys(args: argparse.Namespace) -> int:
    """Deal the keys; user mistakes are one line on stderr and exit 2."""
    from pathlib import Path

    from fedapp.crypto.dealing import deal_federation, is_threshold_key_dir

    if is_threshold_key_dir(args.dir) and not args.force:
        print(f"error: {args.dir} already holds dealt keys; pass --force to replace them", file=sys.stderr)
        return 2
    try:
        params = deal_federation(
            Path(args.dir), num_clients=args.clients, threshold=args.threshold,
            min_contributors=args.min_contributors or args.threshold + 1, bits=args.bits,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"key {params.key_id}: {args.clients} shares, any {params.threshold} decrypt; each client needs "
          f">= {args.min_contributors or args.threshold + 1} signed updates in a sum; files in {args.dir} (party-<id>/ per client)")
    return 0


def make_pools(args: argparse.Namespace) -> int:
    """Offline phase for the chosen clients; prints the cost so it can be reported beside round times."""
    import time
    from pathlib import Path

    from fedapp.components import new_model
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from fedapp.config import ConfigError
    from fedapp.crypto.dealing import is_threshold_key_dir
    from fedapp.crypto.pool_files import pool_path, precompute_pool
    from fedapp.crypto.protocol import settings_for
    from fedapp.hydra_config import compose_experiment
    from fedapp.training import get_weights

    try:
        cfg = compose_experiment(args.overrides)
        if is_threshold_key_dir(args.dir):  # clients hold only the public key: the slower public path
            private_key = load_public_key(args.dir)
        else:
            private_key = load_private_key(args.dir)
        ids = [int(i) for i in args.partitions.replace(" ", ",").split(",") if i] or list(range(cfg.partition.num_clients))
    except (ConfigError, HydraException, OmegaConfBaseException, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.rounds < 1 or any(not 0 <= i < cfg.partition.num_clients for i in ids):
        print(f"error: need --rounds >= 1 and client ids in 0..{cfg.partition.num_clients - 1}", file=sys.stderr)
        return 2
    key_bits = getattr(private_key, "public_key", private_key).bits
    if key_bits != cfg.secagg.key_bits:
        print(f"error: the key in {args.dir} has {key_bits} bits, the experiment "
              f"secagg.key_bits={cfg.secagg.key_bits}", file=sys.stderr)
        return 2
    num_values = sum(a.size for a in get_weights(new_model(cfg)))
    per_round = settings_for(cfg.secagg, cfg.partition.num_clients).layout.num_ciphertexts(num_values)
    started = time.perf_counter()
    for i in ids:
        precompute_pool(pool_path(Path(args.pool_dir), i), private_key, per_round * args.rounds, workers=args.workers)
    seconds = time.perf_counter() - started
    print(f"{len(ids)} pool(s) of {per_round} x {args.rounds} obfuscators in {args.pool_dir}: {seconds:.1f} s, "
          f"{seconds / (len(ids) * args.rounds):.3f} s per client per round")
    return 0


if __name__ == "__main__":
    sys.exit(main())
