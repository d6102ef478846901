//! Passwords for command-line tools: from `LANMESH_PASSWORD`, or typed at a
//! prompt on the terminal (not echoed).

use std::io;

/// The environment variable scripts set instead of typing a password.
pub const PASSWORD_ENV: &str = "LANMESH_PASSWORD";

/// The password from `LANMESH_PASSWORD`, else prompted for on the terminal.
pub fn password(prompt: &str) -> io::Result<String> {
    if let Ok(p) = std::env::var(PASSWORD_ENV) {
        return Ok(p);
    }
    rpassword::prompt_password(prompt).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot prompt for a password ({e}); set {PASSWORD_ENV} instead"),
        )
    })
}
