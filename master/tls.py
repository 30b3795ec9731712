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
    try:
        context.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as err:
        raise BadRequest(f"cannot use {cert_file} with the key {key_file}: {err.reason or err} (both must be "
                         "PEM, the key unencrypted and belonging to the first certificate)") from err
    return context


def client_context() -> ssl.SSLContext:
    """The context every ``https://`` connection to a master uses: certificates verified, host names checked.

    Built once per process, from the system's CAs or ``SSL_CERT_FILE``/``SSL_CERT_DIR``.
    """
    global _client_context
    if _client_context is None:
        _client_context = ssl.create_default_context()
    return _client_context


def is_verify_error(err: BaseException) -> bool:
    """True when ``err`` is a failed certificate check (the CA is not trusted, or the name does not match)."""
    return isinstance(err, ssl.SSLCertVerificationError)


VERIFY_HINT = ("the master's certificate is not trusted here: if a private CA signed it, set SSL_CERT_FILE to "
               "that CA's PEM file")

