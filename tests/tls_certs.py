"""A private CA and a server certificate for 127.0.0.1 and localhost, written as PEM files for TLS tests."""

from __future__ import annotations

import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class Certificates:
    """``ca`` (the CA's certificate), ``cert`` and ``key`` (the server's), all PEM files in ``directory``.

    Args:
        names: the host names and IP addresses the server certificate is for.
        expired: make the server certificate one that expired yesterday.
    """

    def __init__(self, directory: str, name: str = "test", names=("127.0.0.1", "localhost"), expired: bool = False):
        os.makedirs(directory, exist_ok=True)
        now = datetime.datetime.now(datetime.timezone.utc)
        valid = ((now - datetime.timedelta(days=2), now - datetime.timedelta(days=1)) if expired
                 else (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)))
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = (x509.CertificateBuilder().subject_name(_name(f"Keg {name} CA")).issuer_name(_name(f"Keg {name} CA"))
              .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                           content_commitment=False, key_encipherment=False, data_encipherment=False,
                                           key_agreement=False, encipher_only=False, decipher_only=False),
                             critical=True)
              .sign(ca_key, hashes.SHA256()))
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(_name(names[0])).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(valid[0]).not_valid_after(valid[1])
                .add_extension(x509.SubjectAlternativeName([_alt_name(n) for n in names]), critical=False)
                .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        self.ca = _write(os.path.join(directory, f"{name}-ca.pem"), ca.public_bytes(serialization.Encoding.PEM))
        self.cert = _write(os.path.join(directory, f"{name}-cert.pem"), cert.public_bytes(serialization.Encoding.PEM))
        self.key = _write(os.path.join(directory, f"{name}-key.pem"), _key_pem(key))
        self.encrypted_key = _write(os.path.join(directory, f"{name}-key-encrypted.pem"), key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"a passphrase")))


def _alt_name(name: str):
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)
