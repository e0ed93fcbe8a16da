"""TLS certificates: the tracker's TLS listener chooses one by SNI, and ACME orders them for the
host of ``http.public_url``, every verified tracking domain and (``smtp.tls_acme``) the SMTP
host name; see :mod:`relay.certs.manager`."""
