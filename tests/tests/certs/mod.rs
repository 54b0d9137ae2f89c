//! Test certificates: a private CA, and a server certificate it signed for `127.0.0.1` and
//! `localhost`, written as PEM files the way an operator would have them.

use std::path::{Path, PathBuf};

/// PEM files in a test's directory.
pub struct TestCerts {
    /// The CA alone: what clients trust (`--ca-cert`, `SSL_CERT_FILE`).
    pub ca: PathBuf,
    /// The server certificate followed by the CA (`--tls-cert`).
    pub cert: PathBuf,
    /// The server certificate's private key (`--tls-key`).
    pub key: PathBuf,
}

impl TestCerts {
    pub fn create(dir: &Path) -> TestCerts {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "Lull test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().expect("CA key");
        let ca = ca_params.self_signed(&ca_key).expect("CA certificate");

        let mut params = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
            .expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, "127.0.0.1");
        let key = KeyPair::generate().expect("server key");
        let cert = params
            .signed_by(&key, &ca, &ca_key)
            .expect("server certificate");

        let certs = TestCerts {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        };
        std::fs::write(&certs.ca, ca.pem()).expect("write CA");
        std::fs::write(&certs.cert, format!("{}{}", cert.pem(), ca.pem())).expect("write cert");
        std::fs::write(&certs.key, key.serialize_pem()).expect("write key");
        certs
    }

    /// The coordinator flags that serve HTTPS with these files.
    pub fn coordinator_args(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.cert.display().to_string(),
            "--tls-key".into(),
            self.key.display().to_string(),
        ]
    }
}
