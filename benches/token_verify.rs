//! What a subscription token costs: `TokenKeys::verify` (signature, claims,
//! scope), paid once per connection, never per event. HS256 always; RS256
//! (2048-bit) and ES256 (P-256) with keys made by `openssl` when it is
//! installed (skipped otherwise, and said so).
//!
//! Before anything is timed, each token is verified and its grant checked,
//! so a benchmark cannot time a refusal.
//!
//! ```text
//! cargo bench --bench token_verify
//! ```

use criterion::{criterion_group, criterion_main, Criterion};
use shardcast::token::{mint, signing_key, Mint, TokenKeys};
use std::hint::black_box;

const SECRET: &str = "bench-token-secret-0123456789abcdef";

fn claims() -> Mint {
    Mint {
        sub: "user-42".into(),
        types: vec!["chat.*".into(), "presence.*".into()],
        streams: vec!["user-42:*".into()],
        ttl_secs: 3600,
        tenant: None,
    }
}

/// An openssl-made key pair: (private PEM, public PEM); None without openssl.
fn openssl_pair(args: &[&str]) -> Option<(Vec<u8>, String)> {
    let dir = std::env::temp_dir().join(format!("shardcast-token-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).ok()?;
    let key = dir.join("k.pem");
    let ok = std::process::Command::new("openssl")
        .args(args)
        .arg("-out")
        .arg(&key)
        .stderr(std::process::Stdio::null())
        .status()
        .ok()?
        .success();
    if !ok {
        return None;
    }
    let out = std::process::Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&key)
        .output()
        .ok()?;
    let private = std::fs::read(&key).ok()?;
    let _ = std::fs::remove_dir_all(&dir);
    Some((private, String::from_utf8(out.stdout).ok()?))
}

fn verify(c: &mut Criterion) {
    let now = shardcast::token::now_secs();
    let mut cases = Vec::new();
    let hs = TokenKeys::from_config("bench", Some(SECRET), None, None)
        .unwrap()
        .unwrap();
    let (k, alg) = signing_key(Some(SECRET), None).unwrap();
    cases.push(("HS256", hs, mint(&claims(), &k, alg, now).unwrap()));
    for (name, args) in [
        (
            "RS256",
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ][..],
        ),
        (
            "ES256",
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ][..],
        ),
    ] {
        match openssl_pair(args) {
            Some((private, public)) => {
                let keys = TokenKeys::from_config("bench", None, None, Some(&public))
                    .unwrap()
                    .unwrap();
                let (k, alg) = signing_key(None, Some(&private)).unwrap();
                cases.push((name, keys, mint(&claims(), &k, alg, now).unwrap()));
            }
            None => eprintln!("token_verify: no openssl, {name} skipped"),
        }
    }
    let mut g = c.benchmark_group("verify");
    for (name, keys, token) in &cases {
        let grant = keys.verify(token, now).expect("the token verifies");
        assert_eq!(&*grant.sub, "user-42");
        assert_eq!(grant.scope.streams.len(), 1);
        g.bench_function(*name, |b| {
            b.iter(|| keys.verify(black_box(token), now).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, verify);
criterion_main!(benches);
