"""Client JWTs as an EHR (or the CDS Hooks Sandbox) signs them, with a key pair made for the test session."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

TEST_ISSUER = "https://ehr.test"


@dataclass
class SigningKey:
    private_key: ec.EllipticCurvePrivateKey
    kid: str

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(ec.generate_private_key(ec.SECP384R1()), str(uuid.uuid4()))

    def jwks(self) -> dict:
        jwk = json.loads(ECAlgorithm.to_jwk(self.private_key.public_key()))
        jwk.update(kid=self.kid, alg="ES384", use="sig")
        return {"keys": [jwk]}

    def token(self, aud: str, iss: str = TEST_ISSUER, lifetime: int = 300, **claims) -> str:
        """A fresh ES384 token for ``aud`` with its own ``jti``, shaped like the Sandbox's."""
        now = int(time.time())
        payload = {"iss": iss, "aud": aud, "iat": now, "exp": now + lifetime, "jti": str(uuid.uuid4()), **claims}
        return jwt.encode(payload, self.private_key, "ES384", headers={"kid": self.kid, "typ": "JWT"})


def clients_document(key: SigningKey, fhir_servers: list[str], iss: str = TEST_ISSUER) -> dict:
    """A CDS_CLIENTS_FILE document trusting ``key`` for ``iss`` and the given FHIR servers."""
    return {"clients": [{"iss": iss, "jwks": key.jwks(), "fhir_servers": fhir_servers, "tenant": "test"}]}
