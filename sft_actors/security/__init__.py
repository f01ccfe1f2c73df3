"""Trust on hostile networks: one CURVE key pair per actor (files, loading, checks).

Pure of actor logic; the ZAP authenticator that enforces these keys on sockets lives in
:mod:`sft_actors.transport.auth`.
"""

from sft_actors.security.keys import (
    PUBLIC_SUFFIX,
    SECRET_SUFFIX,
    KeyRing,
    generate_keys,
    key_paths,
    load_keyring,
)

__all__ = ["PUBLIC_SUFFIX", "SECRET_SUFFIX", "KeyRing", "generate_keys", "key_paths", "load_keyring"]
