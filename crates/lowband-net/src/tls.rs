//! TLS 1.3 for QUIC where a node is its ed25519 key: a self-signed certificate carries the key,
//! and the verifiers accept a peer only if the key is the expected one (the coordinator, for a
//! site) or on the allow-list (the sites, for the coordinator), and only if the handshake was
//! signed with that key. No certificate authority, no names, no expiry: the key is the identity.

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::identity::{Identity, PublicKey};
use crate::NetError;

/// The ALPN protocol both sides must speak.
pub const ALPN: &[u8] = b"lowband/1";

/// The keys a coordinator admits; shared, so that it can change while the node runs.
pub type AllowList = Arc<RwLock<BTreeSet<PublicKey>>>;

/// DER prefix of an ed25519 SubjectPublicKeyInfo (RFC 8410): SEQUENCE { SEQUENCE { OID
/// 1.3.101.112 }, BIT STRING (33 bytes, no unused bits) }, followed by the 32 key bytes.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// The ed25519 key a certificate carries, if it carries exactly one. (Which key signed the
/// handshake is checked separately, with this key: a certificate that merely mentions an allowed
/// key gets nowhere without its secret.)
pub fn certificate_key(certificate: &[u8]) -> Option<PublicKey> {
    let mut found = None;
    for at in 0..certificate
        .len()
        .saturating_sub(ED25519_SPKI_PREFIX.len() + 32 - 1)
    {
        if certificate[at..].starts_with(&ED25519_SPKI_PREFIX) {
            if found.is_some() {
                return None;
            }
            let key: [u8; 32] = certificate[at + 12..at + 44].try_into().ok()?;
            found = Some(PublicKey(key));
        }
    }
    found
}

/// A self-signed certificate for `identity` and its key in rustls's form.
fn certificate(
    identity: &Identity,
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), NetError> {
    let tls = |e: rcgen::Error| NetError::Tls(format!("making the node certificate: {e}"));
    let key_pair = rcgen::KeyPair::try_from(identity.pkcs8()).map_err(tls)?;
    let certificate = rcgen::CertificateParams::new(vec!["lowband".to_string()])
        .map_err(tls)?
        .self_signed(&key_pair)
        .map_err(tls)?;
    Ok((
        certificate.der().clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(identity.pkcs8().to_vec())),
    ))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn verify_signature(
    message: &[u8],
    certificate: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    if dss.scheme != SignatureScheme::ED25519 {
        return Err(rustls::Error::General(format!(
            "handshake signed with {:?}; lowband nodes sign with ed25519",
            dss.scheme
        )));
    }
    let key = certificate_key(certificate).ok_or_else(|| {
        rustls::Error::General("the certificate carries no single ed25519 key".into())
    })?;
    if key.verify(message, dss.signature()) {
        Ok(HandshakeSignatureValid::assertion())
    } else {
        Err(rustls::Error::General(
            "the handshake signature does not verify with the certificate's key".into(),
        ))
    }
}

/// A site's check of the coordinator: exactly the expected key.
#[derive(Debug)]
struct ExpectedServer(PublicKey);

impl ServerCertVerifier for ExpectedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match certificate_key(end_entity) {
            Some(key) if key == self.0 => Ok(ServerCertVerified::assertion()),
            Some(key) => Err(rustls::Error::General(format!(
                "the server is {key}, not the expected {}",
                self.0
            ))),
            None => Err(rustls::Error::General(
                "the server's certificate carries no single ed25519 key".into(),
            )),
        }
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not used".into()))
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_signature(message, certificate, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// The coordinator's check of a site: a key on the allow-list.
#[derive(Debug)]
struct AllowedClients(AllowList);

impl ClientCertVerifier for AllowedClients {
    fn client_auth_mandatory(&self) -> bool {
        true
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let key = certificate_key(end_entity).ok_or_else(|| {
            rustls::Error::General("the client's certificate carries no single ed25519 key".into())
        })?;
        let allowed = self
            .0
            .read()
            .map_err(|_| rustls::Error::General("allow-list lock poisoned".into()))?
            .contains(&key);
        if allowed {
            Ok(ClientCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "key {key} is not in this cluster"
            )))
        }
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not used".into()))
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_signature(message, certificate, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// TLS for a node that accepts connections from the keys on `allowed`.
pub fn server_config(
    identity: &Identity,
    allowed: AllowList,
) -> Result<rustls::ServerConfig, NetError> {
    let (certificate, key) = certificate(identity)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| NetError::Tls(e.to_string()))?
        .with_client_cert_verifier(Arc::new(AllowedClients(allowed)))
        .with_single_cert(vec![certificate], key)
        .map_err(|e| NetError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// TLS for a node that connects to the node with key `server`.
pub fn client_config(
    identity: &Identity,
    server: PublicKey,
) -> Result<rustls::ClientConfig, NetError> {
    let (certificate, key) = certificate(identity)?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| NetError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ExpectedServer(server)))
        .with_client_auth_cert(vec![certificate], key)
        .map_err(|e| NetError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_carries_its_node_key_once() {
        let identity = Identity::generate().unwrap();
        let (certificate, _) = super::certificate(&identity).unwrap();
        assert_eq!(certificate_key(&certificate), Some(identity.public_key()));
        // Two keys in one certificate are ambiguous: refused.
        let mut doubled = certificate.to_vec();
        doubled.extend_from_slice(&ED25519_SPKI_PREFIX);
        doubled.extend_from_slice(&[7u8; 32]);
        assert_eq!(certificate_key(&doubled), None);
        assert_eq!(certificate_key(&[]), None);
        assert_eq!(certificate_key(&ED25519_SPKI_PREFIX), None, "truncated");
    }
}
