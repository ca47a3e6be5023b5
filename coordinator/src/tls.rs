//! The coordinator's TLS identity (rustls, ring): one PEM certificate chain and key, for the gRPC
//! endpoint nodes join over untrusted networks and, optionally, for the REST API.

use std::path::Path;

use anyhow::{Context as _, Result};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::Config;

/// A certificate chain and its key, read and checked at start-up.
pub struct Identity {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{what}: cannot read {}", path.display()))
}

impl Identity {
    /// The identity of `DROVER_TLS_CERT` and `DROVER_TLS_KEY`; `None` when neither is set.
    pub fn load(config: &Config) -> Result<Option<Self>> {
        let (cert_path, key_path) = match (&config.tls_cert, &config.tls_key) {
            (None, None) => return Ok(None),
            (Some(c), Some(k)) => (c, k),
            _ => {
                anyhow::bail!("DROVER_TLS_CERT and DROVER_TLS_KEY go together: set both or neither")
            }
        };
        let cert_pem = read(cert_path, "DROVER_TLS_CERT")?;
        let key_pem = read(key_path, "DROVER_TLS_KEY")?;
        let certs = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| {
                format!(
                    "DROVER_TLS_CERT {}: not a PEM certificate chain",
                    cert_path.display()
                )
            })?;
        anyhow::ensure!(
            !certs.is_empty(),
            "DROVER_TLS_CERT {}: no certificate in it",
            cert_path.display()
        );
        let key = PrivateKeyDer::from_pem_slice(&key_pem).with_context(|| {
            format!(
                "DROVER_TLS_KEY {}: not a PEM private key",
                key_path.display()
            )
        })?;
        // Refuse a key that does not belong to the certificate now rather than at the first handshake.
        rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs.clone(), key.clone_key())
            .with_context(|| {
                format!(
                    "DROVER_TLS_CERT {} and DROVER_TLS_KEY {} do not make a usable identity",
                    cert_path.display(),
                    key_path.display()
                )
            })?;
        tracing::info!(cert = %cert_path.display(), certificates = certs.len(), "tls identity loaded");
        Ok(Some(Self {
            cert_pem,
            key_pem,
            certs,
            key,
        }))
    }

    /// The tonic server settings.
    pub fn grpc(&self) -> tonic::transport::ServerTlsConfig {
        tonic::transport::ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(
            &self.cert_pem,
            &self.key_pem,
        ))
    }

    /// How a replica calls its peers when it serves TLS: over TLS, trusting the certificates of
    /// its own `DROVER_TLS_CERT` (a certificate the replicas share, or their CA in the chain)
    /// besides the public roots; each peer's certificate must name the host its address has.
    pub fn peer_client(&self) -> tonic::transport::ClientTlsConfig {
        tonic::transport::ClientTlsConfig::new()
            .with_webpki_roots()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.cert_pem))
    }

    /// The rustls settings of the HTTPS server (HTTP/1.1 and h2).
    pub fn https(&self) -> Result<rustls::ServerConfig> {
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(self.certs.clone(), self.key.clone_key())
            .context("the TLS identity cannot serve HTTPS")?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}
