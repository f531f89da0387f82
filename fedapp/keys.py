"""Paillier key command: make the clients' shared key pair outside the server process.

    python -m fedapp.keys generate --dir keys/clients [--public-dir keys/server] [--bits 2048]
    python -m fedapp.keys show --dir keys/clients

``generate`` writes the public and the private key file (0600) to ``--dir``,
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
    show = sub.add_parser("show", help="key id and size of the key in --dir")
    show.add_argument("--dir", required=True)
    args = parser.parse_args(argv)

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
    key = load_public_key(args.dir)
    print(f"key {key.key_id} ({key.bits} bits)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
