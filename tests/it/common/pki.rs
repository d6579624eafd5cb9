//! Certificates made per test run with openssl (nothing to expire), Envoy's
//! downstream mTLS for them, and clients that present them.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Runs openssl in `dir`.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (Debian's openssl package)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`ca.pem`), a server certificate for 127.0.0.1 (`server.pem`) and one
/// client certificate per `(name, extensions)`, all P-256, signed by the CA.
pub fn make(dir: &Path, clients: &[(&str, &str)]) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=valet-test-ca",
    ]);
    openssl(dir, &ca);
    let server = (
        "server",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    );
    for (name, ext) in std::iter::once(&server).chain(clients) {
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        let (key, csr, pem, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        let subj = format!("/CN=valet-test-{name}");
        let mut req = vec!["req"];
        req.extend(ec);
        req.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        openssl(dir, &req);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        );
    }
}

/// Puts Envoy's first listener behind mTLS with the certificates in `dir`.
pub fn require_mtls(cfg: &mut Value, dir: &Path) {
    let file = |n: &str| json!({ "filename": dir.join(n) });
    cfg["static_resources"]["listeners"][0]["filter_chains"][0]["transport_socket"] = json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": true,
            "common_tls_context": {
                "tls_certificates": [{ "certificate_chain": file("server.pem"), "private_key": file("server.key") }],
                "validation_context": { "trusted_ca": file("ca.pem") }
            }
        }
    });
}

/// A client trusting only the CA in `dir` and presenting certificate `name`.
pub fn client(dir: &Path, name: &str) -> reqwest::Client {
    let ca = std::fs::read(dir.join("ca.pem")).unwrap();
    let mut identity = std::fs::read(dir.join(format!("{name}.pem"))).unwrap();
    identity.extend(std::fs::read(dir.join(format!("{name}.key"))).unwrap());
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&ca).unwrap()])
        .identity(reqwest::Identity::from_pem(&identity).unwrap())
        .build()
        .unwrap()
}

/// Waits (30 s at most) until `url` answers 200 to `client`; `log` says why not.
pub async fn wait_ok(client: &reqwest::Client, url: &str, log: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while client
        .get(url)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .ok()
        != Some(200)
    {
        assert!(Instant::now() < deadline, "not ready (mTLS):\n{}", log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
