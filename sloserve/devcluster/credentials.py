"""The dev control plane's secrets, all made fresh per cluster: the admin token (static token
file, group system:masters) and the service-account signing key (RSA, made with openssl)."""

from __future__ import annotations

import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

ADMIN_USER = "sloserve-admin"


@dataclass(frozen=True)
class Credentials:
    admin_token: str
    token_file: Path  # kube-apiserver --token-auth-file
    service_account_key: Path  # signs (controller-manager) and verifies (API server) SA tokens

    @classmethod
    def create(cls, directory: Path) -> Credentials:
        directory.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(16)
        token_file = directory / "tokens.csv"
        # token,user,uid,"group,..."; system:masters passes every RBAC check.
        token_file.write_text(f'{token},{ADMIN_USER},{ADMIN_USER},"system:masters"\n')
        token_file.chmod(0o600)
        key = directory / "service-account.key"
        subprocess.run(
            ["openssl", "genrsa", "-out", str(key), "2048"],
            check=True,
            capture_output=True,
        )
        key.chmod(0o600)
        return cls(admin_token=token, token_file=token_file, service_account_key=key)
