"""TLS for Keg's HTTP: the master's listener (``--tls-cert``/``--tls-key``) and its clients' trust.

A master serves HTTPS itself when given a certificate chain and its key; a
Raft replica does too, and then calls its peers over HTTPS.  Keg's programs
(``keg``, the Mayor, the builder, the scheduler, the router) take
``https://`` master URLs and verify the master's certificate against the
system's CAs, or against the CA file named by ``SSL_CERT_FILE`` (or the
directory ``SSL_CERT_DIR``), the variables OpenSSL and so Python read.  git,
which the builder and a replica's snapshot run and which Debian builds
against GnuTLS, reads neither: ``keg.gitenv.git_http_env`` hands the same
file to it as ``GIT_SSL_CAINFO``.
"""

from __future__ import annotations

import datetime
import http.client
import os
import ssl

from keg.errors import BadRequest

_client_context = None


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server context for the certificate chain in ``cert_file`` and its private key in ``key_file``.

    TLS 1.2 at least, HTTP/1.1 offered by ALPN.

    Raises:
        BadRequest: a file is missing or unreadable, holds no PEM certificate or key, or the key does not
            belong to the certificate.
    """
    for what, path in (("certificate", cert_file), ("key", key_file)):
        if not os.path.isfile(path):
            raise BadRequest(f"the TLS {what} file {path} does not exist")
        if not os.access(path, os.R_OK):
            raise BadRequest(f"the TLS {what} file {path} is not readable by this user")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])

    def no_passphrase():  # OpenSSL would prompt on a terminal, and fail without one (a service)
        raise BadRequest(f"the key {key_file} is encrypted: give the master an unencrypted key, readable "
                         "only by its user (openssl pkey -in KEY -out PLAIN)")
    try:
        context.load_cert_chain(cert_file, key_file, password=no_passphrase)
    except (ssl.SSLError, OSError) as err:
        if isinstance(err.__context__, BadRequest):
            raise err.__context__ from None
        raise BadRequest(f"cannot use {cert_file} with the key {key_file}: {getattr(err, 'reason', None) or err} "
                         "(both must be PEM, the key belonging to the first certificate)") from err
    return context


def expiry_warning(cert_file: str, days: int = 14) -> str | None:
    """A warning when the certificate in ``cert_file`` has expired or expires within ``days``; else None."""
    from cryptography import x509

    with open(cert_file, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    left = cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
    if left.total_seconds() <= 0:
        return f"the TLS certificate {cert_file} expired on {cert.not_valid_after_utc:%Y-%m-%d}: clients refuse it"
    if left.days < days:
        return f"the TLS certificate {cert_file} expires on {cert.not_valid_after_utc:%Y-%m-%d}, in {left.days} days"
    return None


def client_context() -> ssl.SSLContext:
    """The context every ``https://`` connection to a master uses: certificates verified, host names checked.

    Built once per process, from the system's CAs or ``SSL_CERT_FILE``/``SSL_CERT_DIR``.
    """
    global _client_context
    if _client_context is None:
        _client_context = ssl.create_default_context()
    return _client_context


def is_verify_error(err: BaseException | None) -> bool:
    """True when ``err`` is a failed certificate check (the CA is not trusted, the name does not match, …)."""
    return isinstance(err, ssl.SSLCertVerificationError)


def advice(err: BaseException | None, url: str) -> str:
    """What to do about ``err``, met connecting to the master at ``url``: ``" (…)"`` to add to the message, or
    ``""``."""
    https = url.startswith("https://")
    if is_verify_error(err):
        code = getattr(err, "verify_code", None)
        if code == X509_EXPIRED:
            return " (the master's certificate has expired: it needs a new one)"
        if code in X509_NAME_MISMATCH:
            return (" (the master's certificate is not for the host in this URL: use a name the certificate "
                    "covers)")
        where = os.environ.get("SSL_CERT_FILE")
        if where:
            return f" (the master's certificate is not signed by a CA in SSL_CERT_FILE={where})"
        return (" (the master's certificate is not trusted here: if a private CA signed it, set SSL_CERT_FILE to "
                "that CA's PEM file)")
    if https and isinstance(err, ssl.SSLError):
        return " (is the master serving HTTPS? A master without --tls-cert serves http://)"
    if not https and isinstance(err, http.client.RemoteDisconnected):
        return " (if the master serves HTTPS, use https://)"
    return ""


X509_EXPIRED = 10                 # X509_V_ERR_CERT_HAS_EXPIRED
X509_NAME_MISMATCH = (62, 64)     # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH

