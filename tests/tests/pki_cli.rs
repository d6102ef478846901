#![allow(clippy::unwrap_used, clippy::expect_used)]

//! `pki` end to end, as a process, in temporary directories: what it writes,
//! what it refuses, and that what it mints is accepted (or refused) by the
//! same TLS verification the nodes use.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use lanmesh_shared::identity::Role;
use lanmesh_shared::pki::{Ca, LeafRequest, Validity};
use lanmesh_shared::tls::{TlsError, TlsFiles, TlsMaterial};
use lanmesh_tests::{Ran, bin, run};

fn pki(cwd: &Path, args: &[&str]) -> Ran {
    run(&bin("pki"), cwd, args)
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn field<'a>(inspect: &'a str, name: &str) -> &'a str {
    inspect
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {name} in:\n{inspect}"))
}

fn material(dir: &Path, name: &str) -> Result<TlsMaterial, TlsError> {
    TlsMaterial::load(&TlsFiles::new(
        dir.join("ca.crt"),
        Some(dir.join(format!("{name}.crt"))),
        Some(dir.join(format!("{name}.key"))),
    ))
}

/// init + issue of every role: files with the right modes, the identity and
/// usages each role needs, `list` and `inspect` showing them, and each
/// certificate accepted by the nodes' own TLS loading.
#[test]
fn init_issue_list_inspect() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let out = pki(d, &["init", "--cluster-id", "site-a", "--out", "ca"]).ok();
    assert!(out.stdout.contains("site-a"), "{out:?}");
    assert_eq!(mode(&d.join("ca/ca.key")), 0o600);
    assert_eq!(mode(&d.join("ca/ca.crt")), 0o644);

    for (role, name, usage) in [
        ("core", "node-1", "serverAuth, clientAuth"),
        ("edge", "edge-b", "serverAuth, clientAuth"),
        ("operator", "alice", "clientAuth"),
        ("client", "sensor-7", "clientAuth"),
    ] {
        pki(
            d,
            &[
                "issue",
                role,
                "--name",
                name,
                "--ip",
                "10.0.1.11",
                "--ip",
                "fd00::5",
                "--dns",
                "n1.lan",
                "--ca-dir",
                "ca",
                "--out",
                "certs",
            ],
        )
        .ok();
        let crt = d.join(format!("certs/{name}.crt"));
        assert_eq!(mode(&d.join(format!("certs/{name}.key"))), 0o600);
        let info = pki(d, &["inspect", crt.to_str().unwrap()]).ok().stdout;
        assert!(
            field(&info, "Identity").contains(&format!("lanmesh://site-a/{role}/{name}")),
            "{info}"
        );
        assert_eq!(field(&info, "Usage"), usage);
        assert_eq!(field(&info, "IP addresses"), "10.0.1.11, fd00::5");
        assert_eq!(field(&info, "DNS names"), "n1.lan");
        assert!(field(&info, "Status").starts_with("ok ("), "{info}");
        let m = material(&d.join("certs"), name).expect("issued certificate loads");
        assert_eq!(m.identity().unwrap().role.as_str(), role);
    }
    // The CA certificate was copied beside the leaves, once.
    assert_eq!(
        fs::read(d.join("certs/ca.crt")).unwrap(),
        fs::read(d.join("ca/ca.crt")).unwrap()
    );

    let list = pki(d, &["list", "certs"]).ok();
    for name in ["node-1", "edge-b", "alice", "sensor-7"] {
        assert!(list.stdout.contains(name), "{list:?}");
    }
    assert!(list.stdout.contains("ca.crt"));
    assert!(list.stderr.is_empty(), "no warnings expected: {list:?}");
    pki(d, &["list", "certs", "--check"]).ok();
}

/// Existing files are never overwritten without --force, and a refused
/// command changes nothing; --force replaces.
#[test]
fn refuses_to_overwrite_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    pki(d, &["init", "--cluster-id", "c1", "--out", "ca"]).ok();
    let ca_key = fs::read(d.join("ca/ca.key")).unwrap();
    let again = pki(d, &["init", "--cluster-id", "c1", "--out", "ca"]);
    assert_eq!(again.code, Some(1));
    assert!(again.stderr.contains("refusing to overwrite") && again.stderr.contains("--force"));
    assert_eq!(fs::read(d.join("ca/ca.key")).unwrap(), ca_key);

    let issue = [
        "issue", "core", "--name", "n1", "--ca-dir", "ca", "--out", "out",
    ];
    pki(d, &issue).ok();
    let key = fs::read(d.join("out/n1.key")).unwrap();
    assert_eq!(pki(d, &issue).code, Some(1));
    assert_eq!(fs::read(d.join("out/n1.key")).unwrap(), key);
    let mut forced = issue.to_vec();
    forced.push("--force");
    pki(d, &forced).ok();
    assert_ne!(fs::read(d.join("out/n1.key")).unwrap(), key);

    pki(d, &["init", "--cluster-id", "c1", "--out", "ca", "--force"]).ok();
    assert_ne!(fs::read(d.join("ca/ca.key")).unwrap(), ca_key);
}

/// Errors are one clear line on stderr, exit 1, and leave nothing behind.
#[test]
fn errors_are_one_line_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let missing = pki(
        d,
        &[
            "issue", "edge", "--name", "e1", "--ca-dir", "nope", "--out", "out",
        ],
    );
    assert_eq!(missing.code, Some(1));
    assert_eq!(missing.stderr.lines().count(), 1, "{missing:?}");
    assert!(missing.stderr.contains("no CA in nope") && missing.stderr.contains("pki init"));
    assert!(!d.join("out").exists(), "nothing may be written on error");

    pki(d, &["init", "--cluster-id", "c1", "--out", "ca"]).ok();
    for (args, needle) in [
        (
            vec![
                "issue", "core", "--name", "bad/name", "--ca-dir", "ca", "--out", "out",
            ],
            "invalid name",
        ),
        (
            vec![
                "issue", "core", "--name", "ca", "--ca-dir", "ca", "--out", "ca", "--force",
            ],
            "reserved",
        ),
        (
            vec![
                "issue", "core", "--name", "n", "--days", "0", "--ca-dir", "ca", "--out", "out",
            ],
            "--days must be at least 1",
        ),
        (vec!["inspect", "absent.crt"], "cannot read absent.crt"),
        (vec!["inspect", "ca/ca.key"], "no PEM certificate"),
        (
            vec!["revoke", "--serial", "xyz", "--ca-dir", "ca"],
            "not a serial number",
        ),
        (vec!["list", "nowhere"], "cannot read nowhere"),
        (
            vec!["init", "--cluster-id", "bad id", "--out", "x"],
            "invalid cluster id",
        ),
    ] {
        let r = pki(d, &args);
        assert_eq!(r.code, Some(1), "{args:?}: {r:?}");
        assert_eq!(r.stderr.lines().count(), 1, "{args:?}: {r:?}");
        assert!(r.stderr.contains(needle), "{args:?}: {r:?}");
    }
    // A bad IP is a usage error (exit 2) and writes nothing either.
    let r = pki(
        d,
        &[
            "issue", "core", "--name", "n", "--ip", "10.0.0", "--ca-dir", "ca", "--out", "out",
        ],
    );
    assert_eq!(r.code, Some(2));
    assert!(r.stderr.contains("invalid value '10.0.0'"), "{r:?}");
    assert!(!d.join("out").exists());
    // The CA directory holds only what init wrote.
    let mut names: Vec<_> = fs::read_dir(d.join("ca"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["ca.crt", "ca.key"]);
}

/// revoke writes and extends crl.pem, is idempotent, shows in list/inspect,
/// and a node whose own certificate is on the CRL refuses to start.
#[test]
fn revoke_extends_the_crl() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    pki(d, &["init", "--cluster-id", "c1", "--out", "ca"]).ok();
    for name in ["e1", "e2"] {
        pki(
            d,
            &[
                "issue", "edge", "--name", name, "--ca-dir", "ca", "--out", "ca",
            ],
        )
        .ok();
    }
    let serial1 = field(&pki(d, &["inspect", "ca/e1.crt"]).ok().stdout, "Serial").to_owned();
    // Uppercase with colons is accepted too.
    let colons: String = serial1
        .to_uppercase()
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join(":");
    let r = pki(d, &["revoke", "--serial", &colons, "--ca-dir", "ca"]).ok();
    assert!(r.stdout.contains(&serial1), "{r:?}");
    assert_eq!(mode(&d.join("ca/crl.pem")), 0o644);
    let crl1 = fs::read(d.join("ca/crl.pem")).unwrap();
    let again = pki(d, &["revoke", "--serial", &serial1, "--ca-dir", "ca"]).ok();
    assert!(again.stdout.contains("already revoked"));
    assert_eq!(fs::read(d.join("ca/crl.pem")).unwrap(), crl1);

    pki(d, &["revoke", "--cert", "ca/e2.crt", "--ca-dir", "ca"]).ok();
    let crl = pki(d, &["inspect", "ca/crl.pem"]).ok().stdout;
    assert_eq!(field(&crl, "CRL number"), "2");
    assert!(field(&crl, "Revoked").starts_with("2 "), "{crl}");

    let list = pki(d, &["list", "ca"]).ok();
    assert_eq!(list.stdout.matches("REVOKED").count(), 2, "{list:?}");
    assert_eq!(pki(d, &["list", "ca", "--check"]).code, Some(3));
    assert_eq!(
        field(&pki(d, &["inspect", "ca/e1.crt"]).ok().stdout, "Status"),
        "REVOKED"
    );

    // The CRL beside ca.crt is picked up, and a revoked node fails fast.
    let err = material(&d.join("ca"), "e1").unwrap_err();
    assert!(err.to_string().contains("revoked"), "{err}");
}

/// renew keeps identity and SANs, gives a new serial, key and validity, and
/// the result loads; renewing a CA is refused.
#[test]
fn renew_reissues_with_same_identity() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    pki(d, &["init", "--cluster-id", "c1", "--out", "ca"]).ok();
    pki(
        d,
        &[
            "issue",
            "core",
            "--name",
            "node-1",
            "--ip",
            "10.0.0.1",
            "--days",
            "20",
            "--ca-dir",
            "ca",
            "--out",
            "n1",
            "--key-type",
            "ed25519",
        ],
    )
    .ok();
    let before = pki(d, &["inspect", "n1/node-1.crt"]).ok();
    assert!(
        before.stderr.contains("WARNING"),
        "20 days left must warn: {before:?}"
    );
    let key_before = fs::read(d.join("n1/node-1.key")).unwrap();

    let r = pki(
        d,
        &["renew", "n1/node-1.crt", "--ca-dir", "ca", "--days", "400"],
    )
    .ok();
    assert!(r.stdout.contains("pki revoke --serial"), "{r:?}");
    let after = pki(d, &["inspect", "n1/node-1.crt"]).ok();
    for f in ["Identity", "IP addresses", "DNS names", "Usage", "Key"] {
        assert_eq!(field(&before.stdout, f), field(&after.stdout, f), "{f}");
    }
    assert_eq!(field(&after.stdout, "Key"), "Ed25519");
    assert_ne!(
        field(&before.stdout, "Serial"),
        field(&after.stdout, "Serial")
    );
    assert!(
        after.stderr.is_empty(),
        "renewed certificate needs no warning: {after:?}"
    );
    assert_ne!(fs::read(d.join("n1/node-1.key")).unwrap(), key_before);
    assert_eq!(mode(&d.join("n1/node-1.key")), 0o600);
    material(&d.join("n1"), "node-1").expect("renewed certificate loads");

    // --out writes elsewhere and refuses to overwrite there.
    pki(
        d,
        &["renew", "n1/node-1.crt", "--ca-dir", "ca", "--out", "moved"],
    )
    .ok();
    assert!(d.join("moved/node-1.crt").is_file());
    assert_eq!(
        pki(
            d,
            &["renew", "n1/node-1.crt", "--ca-dir", "ca", "--out", "moved"]
        )
        .code,
        Some(1)
    );

    let r = pki(d, &["renew", "ca/ca.crt", "--ca-dir", "ca"]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("CA certificate"), "{r:?}");

    pki(d, &["init", "--cluster-id", "c1", "--out", "twin"]).ok();
    let r = pki(d, &["renew", "n1/node-1.crt", "--ca-dir", "twin"]);
    assert_eq!(r.code, Some(1));
    assert!(
        r.stderr.contains("was not issued by the CA in twin"),
        "{r:?}"
    );

    pki(d, &["init", "--cluster-id", "c2", "--out", "other"]).ok();
    let r = pki(d, &["renew", "n1/node-1.crt", "--ca-dir", "other"]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("cluster"), "{r:?}");
}

/// Expired and soon-expiring certificates are flagged loudly by list and inspect.
#[test]
fn expiry_warnings() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    pki(d, &["init", "--cluster-id", "c1", "--out", "ca"]).ok();
    pki(
        d,
        &[
            "issue", "client", "--name", "soon", "--days", "5", "--ca-dir", "ca", "--out", "ca",
        ],
    )
    .ok();
    // An expired certificate cannot be minted from the CLI; make one with the library.
    let ca = Ca::load(&d.join("ca")).unwrap();
    let mut req = LeafRequest::new(&ca, Role::Client, "old", 1).unwrap();
    let now = time::OffsetDateTime::now_utc();
    req.validity = Validity {
        not_before: now - time::Duration::days(30),
        not_after: now - time::Duration::days(2),
    };
    ca.issue(&req)
        .unwrap()
        .write(&d.join("ca"), "old", false)
        .unwrap();

    let list = pki(d, &["list", "ca"]).ok();
    assert!(list.stdout.contains("EXPIRES IN 5 DAYS"), "{list:?}");
    assert!(list.stdout.contains("EXPIRED on"), "{list:?}");
    assert_eq!(list.stderr.matches("WARNING").count(), 2, "{list:?}");
    assert_eq!(pki(d, &["list", "ca", "--check"]).code, Some(3));
    let inspect = pki(d, &["inspect", "ca/old.crt"]).ok();
    assert!(
        inspect.stderr.contains("WARNING") && inspect.stderr.contains("EXPIRED"),
        "{inspect:?}"
    );
}
