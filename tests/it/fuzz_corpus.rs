//! Every saved fuzz input, replayed through its target's oracle on the
//! stable toolchain: the seed and minimized corpora (`fuzz/corpus/<target>`)
//! and the inputs that once found a bug (`fuzz/regressions/<target>`). The
//! coverage-guided runs themselves are `scripts/fuzz.sh` (cargo-fuzz).

use std::path::Path;

fn replay(target: &str, oracle: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut n = 0;
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        let mut files: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
        files.sort();
        for f in files {
            let data = std::fs::read(&f).unwrap();
            let r = std::panic::catch_unwind(|| oracle(&data));
            assert!(r.is_ok(), "{target}: {} fails its oracle", f.display());
            n += 1;
        }
    }
    assert!(n > 0, "no saved inputs for {target}");
}

#[test]
fn http_head() {
    replay("http_head", shardcast::fuzzing::http_head);
}

#[test]
fn events() {
    replay("events", shardcast::fuzzing::events);
}

#[test]
fn query() {
    replay("query", shardcast::fuzzing::query);
}

#[test]
fn config_toml() {
    replay("config_toml", shardcast::fuzzing::config_toml);
}

#[test]
fn tenants_yaml() {
    replay("tenants_yaml", shardcast::fuzzing::tenants_yaml);
}

#[test]
fn server_stream() {
    replay("server_stream", |data| {
        let (cuts, stream) = shardcast::fuzzing::split_input(data);
        shardcast::fuzzing::server_stream(stream, &cuts);
    });
}

#[test]
fn chunked_body() {
    replay("chunked_body", |data| {
        let (cuts, stream) = shardcast::fuzzing::split_input(data);
        shardcast::fuzzing::chunked_body(stream, &cuts);
    });
}

#[test]
fn token() {
    replay("token", shardcast::fuzzing::token);
}

#[test]
fn log_message() {
    replay("log_message", shardcast::fuzzing::log_message);
}
