"""Mutual TLS between nodes: the cluster's certificate authority, node certificates, and the
one place where a node-to-node stream becomes a TLS 1.3 stream whose peer is a named node.

Why: the node port moves roles and serves whole disks; without authentication one gossiped
frame from anyone who can reach the port moved the primary. With this module every connection
between nodes is TLS 1.3 with a certificate on both sides, signed by the cluster's CA, whose
common name is the node name it speaks for. The HELLO's node name is then checked against that
name (:class:`marsfs.replication.server.Server`), so only the holder of node2's key can speak
as node2.

Rules that hold here:

* One CA per cluster (``marsfs cluster init``): its subject's organizational unit is the cluster
  id, which ``serve --cluster`` must match, so certificates of one cluster never admit a node to
  another. The CA key stays in the CA directory (mode 0600), never on a node unless the operator
  puts it there.
* A node certificate (``marsfs cluster add-node NAME``) names exactly one node: common name and
  DNS subject alternative name ``NAME``, the cluster id as organizational unit, usable as both
  TLS server and client. ``node.key`` is written 0600.
* TLS 1.3 only, the peer's certificate required and verified against ``ca.crt`` on both sides;
  the names are compared by :func:`certified_name` (node names need not be host names, so
  OpenSSL's host name check is off and this comparison replaces it).
* A handshake has :data:`HANDSHAKE_TIMEOUT` seconds; one that fails or times out closes the
  connection and raises :class:`HandshakeFailed` (an OSError: callers that handle an unreachable
  peer handle it), which says what to check.
* No module-level mutable state; this module imports nothing above :mod:`marsfs.node`.
"""

from __future__ import annotations

import datetime
import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from marsfs.aio import describe
from marsfs.errors import InvalidRequest, StateError, UsageError
from marsfs.fsutil import write_atomic
from marsfs.names import RULE, is_name
from marsfs.node.defaults import NODE_DAYS as NODE_DAYS

logger = logging.getLogger(__name__)

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
NODE_CERT = "node.crt"
NODE_KEY = "node.key"
TLS_DIR = "tls"  #: under the state directory, where ``serve`` looks by default
HANDSHAKE_TIMEOUT = 10.0  #: seconds a peer has to complete the TLS handshake
EXPIRY_WARNING_DAYS = 30  #: status warns this many days before the node certificate expires
REFRESH_EVERY = 10.0  #: seconds between two looks whether node.crt was renewed
CA_DAYS = 3650


class HandshakeFailed(OSError):
    """A TLS handshake with a peer failed, or the peer's certificate names another node."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _cluster_of(cert: x509.Certificate) -> str:
    units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    return str(units[0].value) if units else ""


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


@dataclass(frozen=True)
class CaInfo:
    """What ``cluster init`` made, for its output."""

    dir: Path
    cluster: str
    not_after: datetime.datetime


@dataclass(frozen=True)
class Issued:
    """What ``cluster add-node`` wrote, for its output."""

    node: str
    cluster: str
    dir: Path
    not_after: datetime.datetime


def init_ca(ca_dir: Path, cluster: str, *, days: int = CA_DAYS) -> CaInfo:
    """Make the cluster's CA in ``ca_dir`` (``ca.crt``, ``ca.key`` 0600); refused if one is
    there (a second CA would split the cluster: its nodes would not accept each other)."""
    if not cluster.strip():
        raise UsageError("--cluster: give a non-empty cluster id (the one serve --cluster uses)")
    if (ca_dir / CA_KEY).exists() or (ca_dir / CA_CERT).exists():
        raise InvalidRequest(f"{ca_dir} holds a CA already ({CA_CERT}); its nodes trust only it: issue node "
                         f"certificates from it (marsfs cluster add-node NAME --ca {ca_dir} --out DIR), or give "
                         "another --dir for another cluster")
    ca_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "marsfs"),
                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, cluster),
                         x509.NameAttribute(NameOID.COMMON_NAME, f"marsfs cluster {cluster} CA")])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    write_atomic(ca_dir / CA_KEY, _key_pem(key), 0o600)
    write_atomic(ca_dir / CA_CERT, _cert_pem(cert), 0o644)
    return CaInfo(ca_dir, cluster, cert.not_valid_after_utc)


def _read_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((ca_dir / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), password=None)
    except FileNotFoundError as e:
        raise InvalidRequest(f"{e.filename} does not exist: give the directory marsfs cluster init --dir made") from None
    except ValueError as e:
        raise InvalidRequest(f"{ca_dir}: not a marsfs CA ({e})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InvalidRequest(f"{ca_dir / CA_KEY}: not a key marsfs cluster init made")
    return cert, key


def add_node(ca_dir: Path, name: str, out: Path, *, days: int = NODE_DAYS) -> Issued:
    """Issue ``name``'s certificate from the CA in ``ca_dir`` into ``out``: ``ca.crt``,
    ``node.crt`` and ``node.key`` (0600). An existing ``out`` is overwritten file by file, each
    atomically: that is the renewal (a running daemon keeps its old certificate until restart)."""
    if not is_name(name):
        raise InvalidRequest(f"invalid node name {name!r:.80}: use {RULE} (the name its serve --node gives)")
    ca_cert, ca_key = _read_ca(ca_dir)
    cluster = _cluster_of(ca_cert)
    key = _key()
    now = _now()
    not_after = min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "marsfs"),
                                     x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, cluster),
                                     x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(out / NODE_KEY, _key_pem(key), 0o600)
    write_atomic(out / NODE_CERT, _cert_pem(cert), 0o644)
    write_atomic(out / CA_CERT, _cert_pem(ca_cert), 0o644)
    return Issued(name, cluster, out, cert.not_valid_after_utc)


@dataclass
class Tls:
    """A node's TLS setup: the two contexts and what status shows. Read at start, and again
    by :meth:`refresh` when ``node.crt`` changes: that is how a certificate is renewed without
    a restart (connections made after it present the new one)."""

    dir: Path
    node: str
    cluster: str
    not_after: datetime.datetime  #: when this node's certificate expires
    server: ssl.SSLContext
    client: ssl.SSLContext
    loaded: int = 0  #: ``st_mtime_ns`` of the node.crt the contexts hold

    def refresh(self) -> bool:
        """Load ``node.crt`` and ``node.key`` again if the certificate file changed; True if it
        did. A new pair that does not load (of another node or cluster, a key that is not its
        certificate's) is logged once and the old one kept, until ``node.crt`` changes again (so
        a copy puts ``node.key`` in place first)."""
        path = self.dir / NODE_CERT
        try:
            mtime = os.stat(path).st_mtime_ns
        except OSError as e:
            logger.warning("cannot read %s (%s); keeping the certificate loaded at start", path, e.strerror)
            return False
        if mtime == self.loaded:
            return False
        try:
            fresh = load(self.dir, self.node, self.cluster)
        except StateError as e:
            self.loaded = mtime  # said once; tried again when node.crt changes again
            logger.warning("a new certificate in %s does not load, keeping the old one: %s", self.dir, e)
            return False
        # the connections made from here on use the new contexts (they read these attributes)
        self.server, self.client = fresh.server, fresh.client
        self.not_after, self.loaded = fresh.not_after, fresh.loaded
        logger.info("node %s loaded its renewed TLS certificate (expires %s)", self.node,
                    self.not_after.strftime("%Y-%m-%d"))
        return True

    def days_left(self, now: datetime.datetime | None = None) -> float:
        return (self.not_after - (now or _now())).total_seconds() / 86400

    def warning(self, now: datetime.datetime | None = None) -> str | None:
        """The status warning about this node's certificate, or None while it is far from expiry."""
        left = self.days_left(now)
        if left > EXPIRY_WARNING_DAYS:
            return None
        when = self.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")
        if left <= 0:
            return (f"the TLS certificate of node {self.node} expired at {when}: peers refuse this node; issue a "
                    f"new one (marsfs cluster add-node {self.node} --ca CA_DIR --out {self.dir}) and restart")
        return (f"the TLS certificate of node {self.node} expires at {when} (in {left:.0f} days): renew it "
                f"(marsfs cluster add-node {self.node} --ca CA_DIR --out {self.dir}) and restart the daemon")

    def status(self) -> dict[str, Any]:
        return {"mode": "mutual-tls", "dir": os.fspath(self.dir),
                "certificate_expires": self.not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "certificate_days_left": round(self.days_left(), 1)}


def _context(side: ssl._SSLMethod, ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(side)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # node names are compared by certified_name
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=os.fspath(ca))
    ctx.load_cert_chain(os.fspath(cert), os.fspath(key))
    return ctx


def load(tls_dir: Path, node: str, cluster: str) -> Tls:
    """This node's TLS from ``tls_dir``; a StateError that says how to make what is missing or wrong."""
    paths = {f: tls_dir / f for f in (CA_CERT, NODE_CERT, NODE_KEY)}
    missing = [f for f, p in paths.items() if not p.exists()]
    if missing:
        raise StateError(f"no TLS certificates for node {node} in {tls_dir} (missing {', '.join(missing)}): issue "
                         f"them where the cluster's CA is (marsfs cluster add-node {node} --ca CA_DIR --out "
                         f"{tls_dir}; marsfs cluster init --dir CA_DIR makes the CA), or start with --insecure "
                         "to run without TLS (anyone who reaches the port can then act as a node)")
    if os.stat(paths[NODE_KEY]).st_mode & 0o077:
        raise StateError(f"{paths[NODE_KEY]} can be read by others than its owner: chmod 600 {paths[NODE_KEY]}")
    loaded = os.stat(paths[NODE_CERT]).st_mtime_ns
    try:
        ca = x509.load_pem_x509_certificate(paths[CA_CERT].read_bytes())
        cert = x509.load_pem_x509_certificate(paths[NODE_CERT].read_bytes())
    except ValueError as e:
        raise StateError(f"{tls_dir}: a certificate does not parse ({e}); issue them again with marsfs cluster "
                         "add-node") from None
    if _cluster_of(ca) != cluster:
        raise StateError(f"{paths[CA_CERT]} is the CA of cluster {_cluster_of(ca)!r}, but this node runs in cluster "
                         f"{cluster!r} (--cluster): start with --cluster {_cluster_of(ca)}, or issue this node's "
                         "certificate from its own cluster's CA")
    if _common_name(cert) != node:
        raise StateError(f"{paths[NODE_CERT]} is the certificate of node {_common_name(cert)!r}, not of {node!r}: "
                         f"issue {node}'s own (marsfs cluster add-node {node} --ca CA_DIR --out {tls_dir})")
    try:
        server = _context(ssl.PROTOCOL_TLS_SERVER, paths[CA_CERT], paths[NODE_CERT], paths[NODE_KEY])
        client = _context(ssl.PROTOCOL_TLS_CLIENT, paths[CA_CERT], paths[NODE_CERT], paths[NODE_KEY])
    except ssl.SSLError as e:
        raise StateError(f"{tls_dir}: the certificates do not load ({e.reason or e}); issue them again with "
                         "marsfs cluster add-node") from None
    return Tls(tls_dir, node, cluster, cert.not_valid_after_utc, server, client, loaded)


def certified_name(stream: trio.SSLStream[trio.abc.Stream]) -> str:
    """The node name the peer's verified certificate gives (its common name; "" if none)."""
    cert = stream.getpeercert()
    if not cert:
        return ""
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""


def _failure(e: BaseException) -> str:
    if isinstance(e, trio.TooSlowError):
        return f"no handshake within {HANDSHAKE_TIMEOUT:.0f} s"
    return describe(e).removeprefix("TLS: ")


async def client_stream(tcp: trio.abc.Stream, tls: Tls, peer: str) -> trio.SSLStream[trio.abc.Stream]:
    """``tcp`` as a TLS stream to node ``peer``, whose certificate must name it."""
    stream = await _handshake(trio.SSLStream(tcp, tls.client, server_hostname=peer),
                              f"TLS handshake with {peer} failed: {{}}; check that both nodes hold certificates "
                              "of the same cluster CA (marsfs cluster add-node)")
    name = certified_name(stream)
    if name != peer:
        await trio.aclose_forcefully(stream)
        raise HandshakeFailed(f"the node at {peer}'s address presents the certificate of {name or 'no node'!r}, not "
                              f"of {peer}: fix --peer {peer}=HOST:PORT, or that node's certificate")
    return stream


async def server_stream(tcp: trio.abc.Stream, tls: Tls) -> tuple[trio.SSLStream[trio.abc.Stream], str]:
    """``tcp`` (accepted) as a TLS stream, and the node name its verified certificate gives."""
    stream = await _handshake(trio.SSLStream(tcp, tls.server, server_side=True), "{}")
    return stream, certified_name(stream)


async def _handshake(stream: trio.SSLStream[trio.abc.Stream], said: str) -> trio.SSLStream[trio.abc.Stream]:
    """``stream`` once its handshake is done within the deadline; else closed, and
    HandshakeFailed with ``said`` around what went wrong."""
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            await stream.do_handshake()
    except (trio.BrokenResourceError, trio.TooSlowError, ssl.SSLError, OSError) as e:
        await trio.aclose_forcefully(stream)
        raise HandshakeFailed(said.format(_failure(e))) from None
    return stream
