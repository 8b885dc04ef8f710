//! Throwaway certificates made with the `openssl` command (which `scripts/setup.sh` installs).

use std::path::Path;
use std::process::Command;

/// Writes `ca.pem`/`ca-key.pem` (a new CA) into `dir`, and for each `(name, common name,
/// extensions)` a `{name}.pem` and `{name}-key.pem` signed by it.
pub fn issue(dir: &Path, leaves: &[(&str, &str, &str)]) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output();
        match out {
            Ok(out) if out.status.success() => {}
            other => panic!("openssl {args:?} failed (TLS tests need the openssl command): {other:?}"),
        }
    };
    run(&["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem", "-out", "ca.pem"]
        .into_iter()
        .chain(["-days", "1", "-subj", "/CN=herd-test-ca"])
        .collect::<Vec<_>>());
    for (name, cn, ext) in leaves {
        let (key, csr, pem, ext_file) =
            (format!("{name}-key.pem"), format!("{name}.csr"), format!("{name}.pem"), format!("{name}.ext"));
        std::fs::write(dir.join(&ext_file), ext).expect("write the extensions file");
        run(&["req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", &format!("/CN={cn}")]);
        run(&["x509", "-req", "-in", &csr, "-CA", "ca.pem", "-CAkey", "ca-key.pem", "-CAcreateserial"]
            .into_iter()
            .chain(["-out", &pem, "-days", "1", "-extfile", &ext_file])
            .collect::<Vec<_>>());
    }
}
