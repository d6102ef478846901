//! Helpers for the process-level tests in `tests/tests/`: find the real
//! binaries, run them, and wait on conditions with deadlines.
//!
//! Binaries are looked up beside the test executable (`target/<profile>/`).
//! `cargo test --workspace` builds them, because every binary package has
//! integration tests of its own; running only this package after a clean
//! checkout needs a `cargo build --workspace` first, and [`bin`] says so.

pub mod client;
pub mod cluster;
pub mod netns;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Path of a workspace binary (`pki`, `core-node`, `edge-node`).
///
/// Panics with instructions when it has not been built.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current test executable");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "binary {name} not found at {}: run `cargo test --workspace` (or `cargo build --workspace` first)",
        path.display()
    );
    path
}

/// The result of running a program to completion.
#[derive(Debug)]
pub struct Ran {
    /// Exit code (`None` if killed by a signal).
    pub code: Option<i32>,
    /// Standard output, lossily decoded.
    pub stdout: String,
    /// Standard error, lossily decoded.
    pub stderr: String,
}

impl Ran {
    /// Panics with both streams shown unless the program exited 0.
    pub fn ok(self) -> Self {
        assert_eq!(self.code, Some(0), "command failed: {self:#?}");
        self
    }
}

impl From<Output> for Ran {
    fn from(o: Output) -> Self {
        Ran {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// Runs `program args...` in `cwd` with no inherited `LANMESH_*` variables, and
/// waits for it (each call is bounded by the program itself; these are CLIs).
pub fn run(program: &Path, cwd: &Path, args: &[&str]) -> Ran {
    run_env(program, cwd, args, &[])
}

/// [`run`] with extra environment variables.
pub fn run_env(program: &Path, cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Ran {
    let mut cmd = Command::new(program);
    cmd.args(args).current_dir(cwd);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("LANMESH_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()))
        .into()
}

/// Polls `check` every 20 ms until it returns `Some`, or panics naming `what`
/// once `timeout` has passed.
pub fn wait_until<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_until_returns_the_value_once_ready() {
        let start = Instant::now();
        let v = wait_until("a tick", Duration::from_secs(5), || {
            (start.elapsed() > Duration::from_millis(50)).then_some(7)
        });
        assert_eq!(v, 7);
    }

    #[test]
    #[should_panic(expected = "timed out")]
    fn wait_until_gives_up_at_the_deadline() {
        wait_until("never", Duration::from_millis(60), || None::<()>);
    }
}
