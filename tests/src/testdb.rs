//! Fresh databases for tests: a temporary SQLite file, or a new PostgreSQL database on the
//! server named by `TEST_DATABASE_URL`.

use rand::Rng;
use sea_orm::{ConnectionTrait, Database};

/// A database made for one test.
pub struct TestDb {
    /// The URL to open it with.
    pub url: String,
    _dir: Option<tempdir::TempDir>,
}

mod tempdir {
    /// A directory removed when dropped.
    pub struct TempDir(pub std::path::PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl TestDb {
    /// Whether the tests run against PostgreSQL.
    pub fn is_postgres() -> bool {
        std::env::var("TEST_DATABASE_URL").is_ok_and(|u| u.starts_with("postgres"))
    }

    /// Makes a fresh, empty database.
    pub async fn create() -> anyhow::Result<Self> {
        let suffix: u64 = rand::rng().random();
        match std::env::var("TEST_DATABASE_URL") {
            Ok(admin) if admin.starts_with("postgres") => {
                let name = format!("t_{suffix:016x}");
                let db = Database::connect(&admin).await?;
                db.execute_unprepared(&format!("CREATE DATABASE {name}"))
                    .await?;
                db.close().await?;
                let mut url = url::Url::parse(&admin)?;
                url.set_path(&format!("/{name}"));
                Ok(Self {
                    url: url.to_string(),
                    _dir: None,
                })
            }
            _ => {
                let dir = std::env::temp_dir().join(format!("crm-test-{suffix:016x}"));
                std::fs::create_dir_all(&dir)?;
                Ok(Self {
                    url: format!("sqlite://{}/crm.db?mode=rwc", dir.display()),
                    _dir: Some(tempdir::TempDir(dir)),
                })
            }
        }
    }
}
