"""TLS (optionally mutual) for gRPC between the gateway and the services.

Configured by HIE_GRPC_TLS_CERT / HIE_GRPC_TLS_KEY (this process's certificate chain and key,
PEM), HIE_GRPC_TLS_CA (the CA that signed the peers' certificates) and
HIE_GRPC_TLS_CLIENT_AUTH=require (servers demand a client certificate: mTLS). Without them
the loopback default is plaintext; production settings refuse that.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True)
class GrpcTls:
    cert_file: Path
    key_file: Path
    ca_file: Path
    require_client_cert: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GrpcTls | None:
        env = os.environ if env is None else env
        cert, key, ca = (env.get(f"HIE_GRPC_TLS_{n}", "") for n in ("CERT", "KEY", "CA"))
        if not (cert or key or ca):
            return None
        if not (cert and key and ca):
            raise ValueError("HIE_GRPC_TLS_CERT, HIE_GRPC_TLS_KEY and HIE_GRPC_TLS_CA go together")
        return cls(Path(cert), Path(key), Path(ca), env.get("HIE_GRPC_TLS_CLIENT_AUTH", "") == "require")

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key_file.read_bytes(), self.cert_file.read_bytes())],
            root_certificates=self.ca_file.read_bytes(),
            require_client_auth=self.require_client_cert,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        # The client always presents its certificate, so servers may require it (mTLS).
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_file.read_bytes(),
            private_key=self.key_file.read_bytes(),
            certificate_chain=self.cert_file.read_bytes(),
        )
