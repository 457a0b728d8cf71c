"""Certificates a test needs besides the harness's good ones: of another CA, expired, and the
client side of a TLS connection made by hand (an outsider's client that speaks our protocol).

Why here: the in-process handshake matrix (t2) and the attacks on a live node (t4) need the
same forged certificates and the same hand-made client contexts.
"""

from __future__ import annotations

import datetime
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from marsfs.node.tls import CA_CERT, CA_KEY

Pair = tuple[Path, Path]  #: (certificate, key) files


def forged(out: Path, name: str, *, ca: Path | None = None, expired: bool = False) -> Pair:
    """A certificate of node ``name`` in ``out``: self-signed (so of no CA of the cluster:
    another cluster's, as a node sees it) or, with ``ca``, signed by that CA (the one
    ``marsfs cluster init`` made), expired if asked."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "marsfs"),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    signer: ec.EllipticCurvePrivateKey = key
    issuer = subject
    if ca is not None:
        issuer = x509.load_pem_x509_certificate((ca / CA_CERT).read_bytes()).subject
        loaded = serialization.load_pem_private_key((ca / CA_KEY).read_bytes(), password=None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
        signer = loaded
    now = datetime.datetime.now(datetime.UTC)
    start, end = (-30, -1) if expired else (-1, 30)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now + datetime.timedelta(days=start))
            .not_valid_after(now + datetime.timedelta(days=end)).sign(signer, hashes.SHA256()))
    out.mkdir(parents=True, exist_ok=True)
    (out / "c.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / "c.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return out / "c.crt", out / "c.key"


def client_context(ca: Path, cert: Pair | None = None, *, tls12: bool = False) -> ssl.SSLContext:
    """A TLS client trusting ``ca``'s certificate, presenting ``cert`` (None: none), at most
    TLS 1.2 if asked: what an outsider, an impostor or an old client brings."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=os.fspath(ca / CA_CERT))
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        ctx.load_cert_chain(os.fspath(cert[0]), os.fspath(cert[1]))
    return ctx
