//! The `pki` subcommands: each checks its inputs, calls `lanmesh_shared::pki`,
//! and says what it wrote and what to do next.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use lanmesh_shared::identity::{CertInfo, EXPIRY_WARNING_DAYS, Expiry, Subject, normalize_serial};
use lanmesh_shared::pki::{
    CA_CERT_FILE, CRL_FILE, Ca, CrlContents, KeyType, LeafRequest, OutFile, Revoked, Validity,
    read_crl, write_files,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use time::OffsetDateTime;
use time::macros::format_description;

use crate::Command;

/// Names that would collide with the CA's own files.
const RESERVED_NAMES: [&str; 2] = ["ca", "crl"];

pub(crate) fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Init {
            cluster_id,
            out,
            days,
            key_type,
            force,
        } => init(&cluster_id, &out, days, key_type.into(), force),
        Command::Issue {
            role,
            name,
            ips,
            dns,
            days,
            ca_dir,
            out,
            key_type,
            force,
        } => {
            let ca = Ca::load(&ca_dir)?;
            let mut req = LeafRequest::new(&ca, role.into(), &name, days)?;
            req.ips = ips;
            req.dns = dns;
            req.key_type = key_type.into();
            issue(&ca, &ca_dir, &req, &out, force)
        }
        Command::List { dir, check } => list(&dir, check),
        Command::Inspect { file } => inspect(&file),
        Command::Revoke {
            serial,
            cert,
            ca_dir,
        } => revoke(serial.as_deref(), cert.as_deref(), &ca_dir),
        Command::Renew {
            file,
            ca_dir,
            days,
            out,
            force,
        } => renew(&file, &ca_dir, days, out.as_deref(), force),
    }
    .map(|()| ExitCode::SUCCESS)
    .or_else(|e| match e.downcast::<CheckFailed>() {
        Ok(_) => Ok(ExitCode::from(3)),
        Err(e) => Err(e),
    })
}

/// `list --check` found something to warn about (exit status 3, not an error).
#[derive(Debug)]
struct CheckFailed;

impl std::fmt::Display for CheckFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("certificates need attention")
    }
}

impl std::error::Error for CheckFailed {}

fn init(cluster_id: &str, out: &Path, days: u32, key_type: KeyType, force: bool) -> Result<()> {
    let ca = Ca::generate(cluster_id, days, key_type)?;
    ca.write(out, force)?;
    println!(
        "Created the CA of cluster {cluster_id:?} (valid until {}):",
        date(ca.info().not_after)
    );
    println!(
        "  {}  CA certificate: every node and client needs it (--ca)",
        out.join(CA_CERT_FILE).display()
    );
    println!(
        "  {}  CA private key (mode 0600): keep it offline; needed to issue, renew and revoke",
        out.join("ca.key").display()
    );
    println!(
        "Next: pki issue core --name node-1 --ip <node address> --ca-dir {} --out <dir>",
        out.display()
    );
    Ok(())
}

fn issue(ca: &Ca, ca_dir: &Path, req: &LeafRequest, out: &Path, force: bool) -> Result<()> {
    let name = &req.identity.name;
    if RESERVED_NAMES.contains(&name.as_str()) {
        bail!("the name {name:?} is reserved (it would collide with the CA's own files)");
    }
    let issued = ca.issue(req)?;
    let cert_path = out.join(format!("{name}.crt"));
    let key_path = out.join(format!("{name}.key"));
    let mut files = vec![
        OutFile::public(cert_path.clone(), issued.cert_pem.as_bytes()),
        OutFile::secret(key_path.clone(), issued.key_pem.as_bytes()),
    ];
    let ca_copy = out.join(CA_CERT_FILE);
    let copy_ca = !same_dir(out, ca_dir) && !ca_copy.exists();
    if copy_ca {
        files.push(OutFile::public(ca_copy.clone(), ca.cert_pem().as_bytes()));
    } else if !same_dir(out, ca_dir)
        && fs::read(&ca_copy).ok().as_deref() != Some(ca.cert_pem().as_bytes())
    {
        eprintln!(
            "WARNING: {} is not the CA in {}; peers will refuse this certificate if they trust that file",
            ca_copy.display(),
            ca_dir.display()
        );
    }
    write_files(&files, force)?;
    let info = &issued.info;
    println!(
        "Issued {} {} certificate for {name:?} in cluster {:?}, serial {}, valid until {}:",
        if matches!(
            req.identity.role,
            lanmesh_shared::identity::Role::Operator | lanmesh_shared::identity::Role::Edge
        ) {
            "an"
        } else {
            "a"
        },
        req.identity.role,
        req.identity.cluster_id,
        info.serial,
        date(info.not_after)
    );
    println!("  {}", cert_path.display());
    println!("  {}  (mode 0600)", key_path.display());
    if copy_ca {
        println!("  {}  (copy of the CA certificate)", ca_copy.display());
    }
    println!(
        "Use: --ca {} --cert {} --key {}",
        ca_copy.display(),
        cert_path.display(),
        key_path.display()
    );
    Ok(())
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// One row of `pki list`.
struct Row {
    file: String,
    outcome: std::result::Result<CertInfo, String>,
}

fn list(dir: &Path, check: bool) -> Result<()> {
    let entries = fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let ext = p.extension().and_then(|e| e.to_str());
            matches!(ext, Some("crt" | "pem"))
                && p.file_name().and_then(|n| n.to_str()) != Some(CRL_FILE)
        })
        .collect();
    paths.sort();
    let crl = load_crl_beside(dir)?;
    let rows: Vec<Row> = paths
        .iter()
        .map(|p| Row {
            file: p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            outcome: read_cert(p).map_err(|e| format!("{e:#}")),
        })
        .collect();
    if rows.is_empty() {
        println!("no certificates (*.crt, *.pem) in {}", dir.display());
        return Ok(());
    }
    let now = OffsetDateTime::now_utc();
    let mut table = vec![
        [
            "FILE",
            "ROLE",
            "NAME",
            "CLUSTER",
            "SERIAL",
            "NOT AFTER",
            "STATUS",
        ]
        .map(String::from),
    ];
    let mut warnings = Vec::new();
    for row in &rows {
        match &row.outcome {
            Ok(info) => {
                let (role, name) = role_and_name(info);
                let status = status(info, crl.as_ref(), now);
                if status.needs_attention {
                    warnings.push(format!("WARNING: {}: {}", row.file, status.text));
                }
                table.push([
                    row.file.clone(),
                    role,
                    name,
                    info.cluster_id().unwrap_or("-").to_owned(),
                    info.serial.clone(),
                    date(info.not_after),
                    status.text,
                ]);
            }
            Err(e) => {
                warnings.push(format!("WARNING: {}: unreadable: {e}", row.file));
                table.push([
                    row.file.clone(),
                    "?".into(),
                    "?".into(),
                    "?".into(),
                    "?".into(),
                    "?".into(),
                    "UNREADABLE".into(),
                ]);
            }
        }
    }
    print_table(&table);
    for w in &warnings {
        eprintln!("{w}");
    }
    if check && !warnings.is_empty() {
        return Err(CheckFailed.into());
    }
    Ok(())
}

fn print_table<const N: usize>(rows: &[[String; N]]) {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

fn role_and_name(info: &CertInfo) -> (String, String) {
    match &info.lanmesh {
        Some(Subject::Leaf(id)) => (id.role.to_string(), id.name.clone()),
        Some(Subject::Ca { .. }) => ("ca".into(), "-".into()),
        None => ("(not lanmesh)".into(), "-".into()),
    }
}

struct Status {
    text: String,
    needs_attention: bool,
}

fn status(info: &CertInfo, crl: Option<&CrlContents>, now: OffsetDateTime) -> Status {
    if crl.is_some_and(|c| c.revoked.iter().any(|r| r.serial == info.serial)) {
        return Status {
            text: "REVOKED".into(),
            needs_attention: true,
        };
    }
    match info.expiry(now) {
        Expiry::Valid { days } => Status {
            text: format!("ok ({days} days left)"),
            needs_attention: false,
        },
        Expiry::Soon { days } => Status {
            text: format!(
                "EXPIRES IN {days} DAYS (within {EXPIRY_WARNING_DAYS}): renew it with `pki renew`"
            ),
            needs_attention: true,
        },
        Expiry::Expired => Status {
            text: format!(
                "EXPIRED on {}: peers refuse it; renew it with `pki renew`",
                date(info.not_after)
            ),
            needs_attention: true,
        },
        Expiry::NotYetValid => Status {
            text: format!(
                "NOT YET VALID (from {}): check this machine's clock",
                date(info.not_before)
            ),
            needs_attention: true,
        },
    }
}

fn inspect(file: &Path) -> Result<()> {
    let bytes = fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    if CertificateDer::from_pem_slice(&bytes).is_err()
        && String::from_utf8_lossy(&bytes).contains("X509 CRL")
    {
        return inspect_crl(file);
    }
    let info = read_cert(file)?;
    let crl = file.parent().map(load_crl_beside).transpose()?.flatten();
    let now = OffsetDateTime::now_utc();
    let status = status(&info, crl.as_ref(), now);
    let field = |k: &str, v: &str| println!("{:<13} {v}", format!("{k}:"));
    field("File", &file.display().to_string());
    match &info.lanmesh {
        Some(Subject::Leaf(id)) => field(
            "Identity",
            &format!(
                "{} {:?} in cluster {:?}  ({})",
                id.role,
                id.name,
                id.cluster_id,
                id.uri()
            ),
        ),
        Some(Subject::Ca { cluster_id }) => {
            field("Identity", &format!("CA of cluster {cluster_id:?}"))
        }
        None => field("Identity", "none (not issued by `pki`)"),
    }
    field("Subject", &info.subject);
    field("Issuer", &info.issuer);
    field("Serial", &info.serial);
    field("Not before", &datetime(info.not_before));
    field("Not after", &datetime(info.not_after));
    field("Status", &status.text);
    field("Key", &info.key_algorithm);
    field("CA", if info.is_ca { "yes" } else { "no" });
    if !info.usages.is_empty() {
        field("Usage", &info.usages.join(", "));
    }
    let join = |v: Vec<String>| {
        if v.is_empty() {
            "-".into()
        } else {
            v.join(", ")
        }
    };
    field("DNS names", &join(info.dns_names.clone()));
    field(
        "IP addresses",
        &join(info.ip_addrs.iter().map(|i| i.to_string()).collect()),
    );
    field("URIs", &join(info.uris.clone()));
    if status.needs_attention {
        eprintln!("WARNING: {}: {}", file.display(), status.text);
    }
    Ok(())
}

fn inspect_crl(file: &Path) -> Result<()> {
    let crl = read_crl(file)?;
    println!("File:         {}", file.display());
    println!("CRL number:   {}", crl.number);
    println!("Revoked:      {} certificate(s)", crl.revoked.len());
    for r in &crl.revoked {
        println!("  {}  revoked {}", r.serial, datetime(r.revoked_at));
    }
    Ok(())
}

fn revoke(serial: Option<&str>, cert: Option<&Path>, ca_dir: &Path) -> Result<()> {
    let ca = Ca::load(ca_dir)?;
    let (serial, who) = match (serial, cert) {
        (Some(s), _) => (
            normalize_serial(s).with_context(|| {
                format!(
                    "{s:?} is not a serial number (expected hex digits, as `pki list` prints them)"
                )
            })?,
            None,
        ),
        (None, Some(path)) => {
            let info = read_cert(path)?;
            if info.cluster_id() != Some(ca.cluster_id()) {
                bail!(
                    "{} is not a certificate of cluster {:?}",
                    path.display(),
                    ca.cluster_id()
                );
            }
            let who = info.identity().ok().map(|i| i.to_string());
            (info.serial, who)
        }
        (None, None) => bail!("give --serial or --cert"),
    };
    let crl_path = ca_dir.join(CRL_FILE);
    let mut crl = if crl_path.exists() {
        read_crl(&crl_path)?
    } else {
        CrlContents::default()
    };
    if crl.revoked.iter().any(|r| r.serial == serial) {
        println!(
            "Serial {serial} is already revoked in {}; nothing changed.",
            crl_path.display()
        );
        return Ok(());
    }
    crl.revoked.push(Revoked {
        serial: serial.clone(),
        revoked_at: OffsetDateTime::now_utc(),
    });
    let number = crl.number + 1;
    let pem = ca.revocation_list(number, &crl.revoked)?;
    write_files(&[OutFile::public(crl_path.clone(), pem)], true)?;
    println!(
        "Revoked serial {serial}{}. {} now lists {} certificate(s) (CRL number {number}).",
        who.map(|w| format!(" ({w})")).unwrap_or_default(),
        crl_path.display(),
        crl.revoked.len()
    );
    println!("Copy it next to ca.crt on every node; nodes load crl.pem from there.");
    Ok(())
}

fn renew(
    file: &Path,
    ca_dir: &Path,
    days: Option<u32>,
    out: Option<&Path>,
    force: bool,
) -> Result<()> {
    let ca = Ca::load(ca_dir)?;
    let old = read_cert(file)?;
    if old.is_ca {
        bail!(
            "{} is a CA certificate; `pki renew` renews node, operator and client certificates (a new CA needs `pki init`)",
            file.display()
        );
    }
    let identity = old
        .identity()
        .with_context(|| format!("{} cannot be renewed", file.display()))?
        .clone();
    if identity.cluster_id != ca.cluster_id() {
        bail!(
            "{} belongs to cluster {:?}, but the CA in {} is for cluster {:?}",
            file.display(),
            identity.cluster_id,
            ca_dir.display(),
            ca.cluster_id()
        );
    }
    if let (Some(aki), Some(ski)) = (&old.authority_key_id, &ca.info().subject_key_id)
        && aki != ski
    {
        bail!(
            "{} was not issued by the CA in {} (another CA of the same cluster id?)",
            file.display(),
            ca_dir.display()
        );
    }
    let days = match days {
        Some(d) => d,
        None => u32::try_from((old.not_after - old.not_before).whole_days().max(1)).unwrap_or(1),
    };
    let req = LeafRequest {
        identity: identity.clone(),
        ips: old.ip_addrs.clone(),
        dns: old.dns_names.clone(),
        validity: Validity::days_from_now(days)?,
        key_type: if old.key_algorithm == "Ed25519" {
            KeyType::Ed25519
        } else {
            KeyType::EcdsaP256
        },
    };
    let issued = ca.issue(&req)?;
    let (cert_path, key_path, overwrite) = match out {
        Some(dir) => (
            dir.join(format!("{}.crt", identity.name)),
            dir.join(format!("{}.key", identity.name)),
            force,
        ),
        None => (file.to_owned(), file.with_extension("key"), true),
    };
    write_files(
        &[
            OutFile::public(cert_path.clone(), issued.cert_pem.as_bytes()),
            OutFile::secret(key_path.clone(), issued.key_pem.as_bytes()),
        ],
        overwrite,
    )?;
    println!(
        "Renewed {identity}: serial {} -> {}, valid until {}:",
        old.serial,
        issued.info.serial,
        date(issued.info.not_after)
    );
    println!("  {}", cert_path.display());
    println!("  {}  (new key, mode 0600)", key_path.display());
    println!(
        "The old certificate stays valid until {}; to stop it now: pki revoke --serial {} --ca-dir {}",
        date(old.not_after),
        old.serial,
        ca_dir.display()
    );
    Ok(())
}

fn read_cert(path: &Path) -> Result<CertInfo> {
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let der = CertificateDer::from_pem_slice(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: no PEM certificate in it ({e})", path.display()))?;
    CertInfo::from_der(&der).with_context(|| format!("{}", path.display()))
}

fn load_crl_beside(dir: &Path) -> Result<Option<CrlContents>> {
    let path = dir.join(CRL_FILE);
    if path.exists() {
        Ok(Some(read_crl(&path)?))
    } else {
        Ok(None)
    }
}

fn date(t: OffsetDateTime) -> String {
    t.format(format_description!("[year]-[month]-[day]"))
        .unwrap_or_else(|_| t.to_string())
}

fn datetime(t: OffsetDateTime) -> String {
    t.format(format_description!(
        "[year]-[month]-[day] [hour]:[minute]:[second] UTC"
    ))
    .unwrap_or_else(|_| t.to_string())
}
