//! TLS from the start ("implicit TLS", RFC 8314; port 465) over a TCP stream the module opened
//! itself, so that the stream has `TCP_NODELAY` (lettre's own TLS connect opens a socket without
//! it: each message's last segment would wait for a delayed ACK) and so that a failed
//! handshake is told apart from a server that never greets. Trusts what lettre's STARTTLS
//! trusts: the web PKI's roots (`webpki-roots`) and the server's extra CA certificate, with
//! rustls and its `ring` provider, TLS 1.2 or later.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use lettre::transport::smtp::client::AsyncTokioStream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

/// A TLS session over a TCP stream, as lettre's connection reads and writes it.
#[derive(Debug)]
pub(crate) struct ImplicitTls(tokio_rustls::client::TlsStream<TcpStream>);

/// Why a TLS session could not be set up, in words (never a secret): the server's certificate
/// was refused (rustls' words, `invalid peer certificate: …`, which the classification reads),
/// the server answered in plain text (its port does not take TLS from the start), or another
/// handshake failure.
#[derive(Debug)]
pub(crate) struct HandshakeFailed(pub String);

/// The client configuration for `extra_ca_pem` (the server's extra trusted CA, PEM), or why
/// it cannot be read.
fn config(extra_ca_pem: Option<&str>) -> Result<ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(pem) = extra_ca_pem.filter(|p| !p.trim().is_empty()) {
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert = cert.map_err(|e| format!("the extra CA certificate cannot be read: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("the extra CA certificate is not usable: {e}"))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Sets up TLS with `host` (the name its certificate must carry) over `tcp`, before any SMTP.
pub(crate) async fn handshake(
    tcp: TcpStream,
    host: &str,
    extra_ca_pem: Option<&str>,
) -> Result<ImplicitTls, HandshakeFailed> {
    let config = config(extra_ca_pem).map_err(HandshakeFailed)?;
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| HandshakeFailed(format!("{host} is not a name TLS can check: {e}")))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    connector
        .connect(name, tcp)
        .await
        .map(ImplicitTls)
        .map_err(|e| {
            // A server that greets in plain text sends "220 …" where a TLS record was due.
            let plain_text = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                .is_some_and(|r| {
                    matches!(
                        r,
                        rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType)
                    )
                });
            HandshakeFailed(if plain_text {
                format!("TLS handshake failed: the server answered in plain text, not TLS ({e})")
            } else {
                format!("TLS handshake failed: {e}")
            })
        })
}

impl AsyncRead for ImplicitTls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for ImplicitTls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

impl AsyncTokioStream for ImplicitTls {
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.0.get_ref().0.peer_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_extra_ca_that_is_not_pem_is_refused_in_words() {
        let e = config(Some(
            "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
        ))
        .expect_err("refused");
        assert!(e.contains("extra CA certificate"), "{e}");
        assert!(config(None).is_ok());
        assert!(config(Some("  \n")).is_ok());
    }
}
