//! Which external tools the tests that need them may count on, as cfgs for
//! the test targets: `tool_wrk`, `tool_curl`, `tool_nginx`, `tool_nchan`,
//! `tool_chromium`, `tool_openssl`, `tool_nats`. A test marked
//! `#[cfg_attr(not(tool_x), ignore = "...")]` is reported as ignored, not
//! passed, on a machine without the tool; under `CI=true` every cfg is set,
//! so a missing tool fails its test instead (`.ci/run` installs them all).

use std::path::Path;

const TOOLS: &[(&str, &[&str])] = &[
    ("wrk", &["/usr/bin/wrk", "/usr/local/bin/wrk"]),
    ("curl", &["/usr/bin/curl", "/usr/local/bin/curl"]),
    (
        "nginx",
        &["/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx"],
    ),
    ("nchan", &["/usr/lib/nginx/modules/ngx_nchan_module.so"]),
    ("openssl", &["/usr/bin/openssl", "/usr/local/bin/openssl"]),
    (
        "nats",
        &[
            "/usr/sbin/nats-server",
            "/usr/bin/nats-server",
            "/usr/local/bin/nats-server",
        ],
    ),
    (
        "chromium",
        &[
            "/usr/bin/chromium",
            "/usr/bin/chromium-browser",
            "/usr/bin/google-chrome",
        ],
    ),
];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=CI");
    // An install or removal changes these directories' modification times.
    for dir in [
        "/usr/bin",
        "/usr/sbin",
        "/usr/local/bin",
        "/usr/lib/nginx/modules",
    ] {
        if Path::new(dir).is_dir() {
            println!("cargo::rerun-if-changed={dir}");
        }
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    for (tool, paths) in TOOLS {
        println!("cargo::rustc-check-cfg=cfg(tool_{tool})");
        if ci || paths.iter().any(|p| Path::new(p).exists()) {
            println!("cargo::rustc-cfg=tool_{tool}");
        }
    }
}
