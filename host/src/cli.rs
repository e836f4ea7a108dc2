//! What the operator CLI needs besides `serve`: the first operator (`user add`), and finding the
//! database and the sealing key the way `demo` stores them, without ever creating a database.

use anyhow::Context;
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter};
use std::io::BufRead;
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::entities::user;

/// Where `demo` keeps its sealing key, relative to the folder it runs in.
pub const DEMO_KEY_FILE: &str = "data/sealing.key";

/// The shortest password `user add` accepts.
pub const MIN_PASSWORD_CHARS: usize = 12;

/// A few of the passwords every list of leaked passwords starts with (compared lowercased).
const COMMON_PASSWORDS: [&str; 16] = [
    "123456789012",
    "1234567890123",
    "password1234",
    "password12345",
    "passwordpassword",
    "qwertyuiop123",
    "qwerty123456",
    "administrator",
    "administrator1",
    "letmein12345",
    "welcome12345",
    "iloveyou1234",
    "changeme1234",
    "111111111111",
    "000000000000",
    "aaaaaaaaaaaa",
];

/// Why `password` is too weak for the account `email`, if it is.
pub fn password_problem(password: &str, email: &str) -> Option<String> {
    let chars = password.chars().count();
    let lower = password.to_lowercase();
    let local = email.split('@').next().unwrap_or_default().to_lowercase();
    if chars < MIN_PASSWORD_CHARS {
        Some(format!(
            "the password is too short ({chars} characters): use at least {MIN_PASSWORD_CHARS} — a few unrelated words make a good one"
        ))
    } else if COMMON_PASSWORDS.contains(&lower.as_str()) {
        Some("the password is one of the most common passwords, the first ones an attacker tries: choose another".into())
    } else if password.chars().all(|c| password.starts_with(c)) {
        Some("the password repeats one character: choose another".into())
    } else if local.len() >= 3 && lower.contains(&local) {
        Some("the password contains the account's name: choose another".into())
    } else {
        None
    }
}

/// The sealing key file `demo` wrote in this folder, when there is one and nothing else is set.
pub fn demo_key_file(config: &Config) -> Option<PathBuf> {
    let path = Path::new(DEMO_KEY_FILE);
    (config.sealing_key.is_none() && config.sealing_key_file.is_none() && path.is_file())
        .then(|| path.to_path_buf())
}

/// The database URL for a command that must not create a database: an SQLite file must exist,
/// and is opened read-write without `mode=rwc`.
pub fn existing_database_url(config: &Config) -> anyhow::Result<String> {
    let url = config.database_url.clone();
    let Some(rest) = url.strip_prefix("sqlite:") else {
        return Ok(url);
    };
    if url.contains(":memory:") {
        return Ok(url);
    }
    let (path, query) = match rest.trim_start_matches("//").split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (rest.trim_start_matches("//").to_string(), None),
    };
    if !Path::new(&path).is_file() {
        anyhow::bail!(
            "no database at {path}: this command does not create one. Run it in the folder where `crm-host demo` or `crm-host serve` keeps its data, set CRM_DATABASE_URL, or create the database with `crm-host migrate` first"
        );
    }
    let params: Vec<String> = query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("mode="))
        .map(str::to_string)
        .chain(std::iter::once("mode=rw".to_string()))
        .collect();
    Ok(format!("sqlite://{path}?{}", params.join("&")))
}

/// Reads the new password: from a terminal with a prompt and without echo (asked twice),
/// otherwise the first line of standard input.
pub fn read_password() -> anyhow::Result<String> {
    let stdin = std::io::stdin();
    if !std::io::IsTerminal::is_terminal(&stdin) {
        let mut line = String::new();
        stdin
            .lock()
            .read_line(&mut line)
            .context("reading the password from standard input")?;
        return Ok(line.trim_end_matches(['\r', '\n']).to_string());
    }
    let ask = |prompt: &str| -> anyhow::Result<String> {
        eprint!("{prompt}");
        let echo_off = std::process::Command::new("stty")
            .arg("-echo")
            .stdin(std::process::Stdio::inherit())
            .status()
            .is_ok_and(|s| s.success());
        let mut line = String::new();
        let read = stdin.lock().read_line(&mut line);
        if echo_off {
            let _ = std::process::Command::new("stty")
                .arg("echo")
                .stdin(std::process::Stdio::inherit())
                .status();
            eprintln!();
        }
        read.context("reading the password")?;
        Ok(line.trim_end_matches(['\r', '\n']).to_string())
    };
    let first = ask("Password: ")?;
    let again = ask("Password again: ")?;
    if first != again {
        anyhow::bail!("the two passwords differ; nothing was created");
    }
    Ok(first)
}

/// Creates a user who can sign in, refusing a taken address or a weak password; returns its id.
pub async fn add_user(
    db: &DatabaseConnection,
    email: &str,
    name: Option<&str>,
    password: &str,
    operator: bool,
) -> anyhow::Result<i64> {
    let email = email.trim().to_lowercase();
    let valid = email
        .split_once('@')
        .is_some_and(|(l, d)| !l.is_empty() && d.contains('.'))
        && !email.chars().any(|c| c.is_whitespace() || c.is_control());
    if !valid {
        anyhow::bail!("`{email}` is not an e-mail address");
    }
    if let Some(problem) = password_problem(password, &email) {
        anyhow::bail!("refused: {problem}. Nothing was created");
    }
    if user::Entity::find()
        .filter(user::Column::Email.eq(&email))
        .one(db)
        .await?
        .is_some()
    {
        anyhow::bail!("a user {email} exists already; nothing was created");
    }
    let name = name
        .map(str::to_string)
        .unwrap_or_else(|| email.split('@').next().unwrap_or_default().to_string());
    crate::seed::create_user(db, &email, &name, password, operator).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weak_passwords_are_refused_with_the_reason() {
        let email = "olivia@contoso.example";
        assert!(
            password_problem("short", email)
                .unwrap_or_default()
                .contains("too short")
        );
        assert!(
            password_problem("Password1234", email)
                .unwrap_or_default()
                .contains("common")
        );
        assert!(
            password_problem("olivia-the-operator", email)
                .unwrap_or_default()
                .contains("name")
        );
        assert!(password_problem("zzzzzzzzzzzzzz", email).is_some());
        assert_eq!(
            password_problem("correct horse battery staple", email),
            None
        );
    }

    #[test]
    fn commands_that_must_not_create_a_database_say_so() {
        let config = Config {
            database_url: "sqlite:///nonexistent-crm-dir/crm.db?mode=rwc".into(),
            ..Config::default()
        };
        let err = existing_database_url(&config).expect_err("refused");
        assert!(err.to_string().contains("no database at"), "{err}");
        let file = std::env::temp_dir().join(format!("crm-cli-url-{}.db", std::process::id()));
        std::fs::write(&file, b"").expect("file");
        let config = Config {
            database_url: format!("sqlite://{}?mode=rwc", file.display()),
            ..Config::default()
        };
        let url = existing_database_url(&config).expect("exists");
        assert!(url.ends_with("?mode=rw"), "{url}");
        let _ = std::fs::remove_file(file);
    }
}
