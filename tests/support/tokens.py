"""Client JWTs as an EHR (or the CDS Hooks Sandbox) signs them, with a key pair made for the test session."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

TEST_ISSUER = "https://ehr.test"


@dataclass
class SigningKey:
    private_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    kid: str
    alg: str = "ES384"

    @classmethod
    def generate(cls, alg: str = "ES384") -> SigningKey:
        """ES384 as the CDS Hooks Sandbox signs, or RS384 as many EHRs do."""
        if alg == "RS384":
            return cls(rsa.generate_private_key(public_exponent=65537, key_size=2048), str(uuid.uuid4()), alg)
        return cls(ec.generate_private_key(ec.SECP384R1()), str(uuid.uuid4()), "ES384")

    def jwks(self) -> dict:
        to_jwk = RSAAlgorithm.to_jwk if self.alg == "RS384" else ECAlgorithm.to_jwk
        jwk = json.loads(to_jwk(self.private_key.public_key()))
        jwk.update(kid=self.kid, alg=self.alg, use="sig")
        return {"keys": [jwk]}

    def token(self, aud: str, iss: str = TEST_ISSUER, lifetime: int = 300, **claims) -> str:
        """A fresh token for ``aud`` with its own ``jti``, shaped like the Sandbox's."""
        now = int(time.time())
        payload = {"iss": iss, "aud": aud, "iat": now, "exp": now + lifetime, "jti": str(uuid.uuid4()), **claims}
        return jwt.encode(payload, self.private_key, self.alg, headers={"kid": self.kid, "typ": "JWT"})


def clients_document(key: SigningKey, fhir_servers: list[str], iss: str = TEST_ISSUER) -> dict:
    """A CDS_CLIENTS_FILE document trusting ``key`` for ``iss`` and the given FHIR servers."""
    return {"clients": [{"iss": iss, "jwks": key.jwks(), "fhir_servers": fhir_servers, "tenant": "test"}]}
