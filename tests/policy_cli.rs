//! `incident-stream policy check DIR`: the same validation as a reload, every error of every
//! file on stderr with file, line and key, exit 1; exit 0 with the tenants when the set is valid.

mod common;

use std::process::Command;

fn check(dir: &std::path::Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_incident-stream"))
        .args(["policy", "check", dir.to_str().expect("utf8")])
        .output()
        .expect("run the binary");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn policy_check_reports_every_bad_file_and_fails() {
    let dir = common::fresh_dir();
    std::fs::write(dir.join("_defaults.toml"), common::TEST_DEFAULTS).expect("defaults");
    common::write_tenant(&dir, "acme", "[limits]\nmax_connections = 0\n");
    common::write_tenant(&dir, "globex", "allowed_event_types = [\"nope\"]\n");
    common::write_tenant(&dir, "initech", "colour = \"red\"\n");
    std::fs::write(dir.join("wrong.toml"), "tenant = \"right\"\n").expect("file");
    common::write_tenant(&dir, "ops", "");
    let (code, stdout, stderr) = check(&dir);
    assert_eq!(code, 1, "{stdout}{stderr}");
    for needle in [
        "acme.toml: line 3, key `limits.max_connections`",
        "globex.toml: line 2, key `allowed_event_types`: unknown EventType `nope`",
        "initech.toml: TOML parse error at line 2",
        "colour",
        "wrong.toml: line 1, key `tenant`",
        "4 error(s); a reload would change nothing",
    ] {
        assert!(stderr.contains(needle), "{needle:?} not in:\n{stderr}");
    }
    assert!(!stderr.contains("ops.toml"), "the good file is not named:\n{stderr}");
}

#[test]
fn policy_check_passes_the_shipped_policies() {
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let (code, stdout, stderr) = check(&shipped);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("ok, 2 tenants: acme, globex"), "{stdout}");
}
