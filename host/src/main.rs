//! `crm-host`: the reference CRM with the `microsoft_outlook` module linked.

use anyhow::Context;
use clap::{Parser, Subcommand};
use crm_host::{Application, Config, HostOptions, linked_modules};
use crm_sdk::{SealingKey, SystemClock};
use secrecy::ExposeSecret;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "crm-host",
    version,
    about = "The reference CRM host with the microsoft_outlook module"
)]
struct Cli {
    /// A TOML configuration file (default: ./crm.toml when present).
    #[arg(long, global = true, env = "CRM_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Sets up ./data (SQLite, sealing key, demo users and contacts), enables the module and serves.
    Demo {
        /// Address to listen on.
        #[arg(long, env = "CRM_BIND", default_value = "127.0.0.1:8080")]
        bind: String,
    },
    /// Serves with the layered configuration (defaults, file, CRM_ environment).
    Serve,
    /// Applies the host's and every linked module's migrations, then exits.
    Migrate,
    /// The microsoft_outlook module's operator commands.
    Outlook {
        #[command(subcommand)]
        command: OutlookCommand,
    },
    /// People who sign in to the CRM.
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Adds a user (the first operator of a fresh install, for one). The password is read from
    /// standard input, or asked for on a terminal; at least 12 characters, not a common one.
    Add {
        /// The e-mail address they sign in with.
        email: String,
        /// An operator (administrator): settings, modules, shared mail servers.
        #[arg(long)]
        operator: bool,
        /// The name shown in the CRM (default: the address's local part).
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(Subcommand)]
enum OutlookCommand {
    /// A table of every mail server: mailbox, kind, status, token expiry, last refresh, last error.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Refreshes tokens now, with the same code as the nightly job, and prints what happened.
    Refresh {
        /// Only this mail server.
        #[arg(long, conflicts_with = "all")]
        mailbox: Option<i32>,
        /// Every connected mail server (the default).
        #[arg(long)]
        all: bool,
    },
}

fn init_logs(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: log files and journald get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// The sealing key for operator commands: the configured one, or the one `demo` keeps in
/// ./data when run in a demo folder.
fn cli_sealing_key(config: &Config) -> anyhow::Result<SealingKey> {
    match crm_host::cli::demo_key_file(config) {
        Some(file) => SealingKey::from_file(&file)
            .with_context(|| format!("reading the demo's sealing key {}", file.display())),
        None => sealing_key(config),
    }
}

fn sealing_key(config: &Config) -> anyhow::Result<SealingKey> {
    if let Some(key) = &config.sealing_key {
        return SealingKey::from_base64(key.expose_secret()).context("CRM_SEALING_KEY");
    }
    if let Some(file) = &config.sealing_key_file {
        return SealingKey::from_file(file).context("CRM_SEALING_KEY_FILE");
    }
    anyhow::bail!(
        "no sealing key: secrets (client secret, tokens) are sealed with a key that is never stored \
         in the database. Set CRM_SEALING_KEY to 32 random bytes in base64 (e.g. `openssl rand -base64 32`) \
         or CRM_SEALING_KEY_FILE to a file holding it"
    )
}

/// The glibc malloc setting the host runs with: a fixed mmap threshold of 128 KiB. By default
/// glibc raises the threshold each time a large block is freed (up to 32 MiB), so after the
/// first mail with a 20 MB file every later one is allocated in a thread's arena, which keeps
/// its pages: one drain of 100 such mails peaked at 237 MiB, against 80 MiB with the threshold
/// fixed (BENCHMARKS.md, "Mails with large files"). Set before `main` runs, by re-executing.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MALLOC_TUNABLE: &str = "glibc.malloc.mmap_threshold=131072";

/// Set in the re-executed process: it never re-executes again (a loader that drops
/// `GLIBC_TUNABLES`, as for a binary with file capabilities, would otherwise loop).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const REEXECUTED: &str = "CRM_MALLOC_TUNED";

/// Re-executes this binary with [`MALLOC_TUNABLE`] added to `GLIBC_TUNABLES` (same process id,
/// `argv[0]`, arguments and environment otherwise), once, unless the variable names an mmap
/// threshold of its own or is not UTF-8. Returns if the exec fails (the host runs on with
/// glibc's defaults).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn with_malloc_tunable() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os(REEXECUTED).is_some() {
        return;
    }
    let current = match std::env::var("GLIBC_TUNABLES") {
        Ok(v) => v,
        Err(std::env::VarError::NotPresent) => String::new(),
        Err(std::env::VarError::NotUnicode(_)) => return,
    };
    if current.contains("glibc.malloc.mmap_threshold") {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let tunables = if current.is_empty() {
        MALLOC_TUNABLE.to_string()
    } else {
        format!("{current}:{MALLOC_TUNABLE}")
    };
    let mut args = std::env::args_os();
    let mut command = std::process::Command::new(exe);
    if let Some(arg0) = args.next() {
        command.arg0(arg0);
    }
    let error = command
        .args(args)
        .env("GLIBC_TUNABLES", tunables)
        .env(REEXECUTED, "1")
        .exec();
    eprintln!("note: running with glibc's default malloc settings ({error})");
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn with_malloc_tunable() {}

fn main() -> anyhow::Result<()> {
    with_malloc_tunable();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut config = Config::load(cli.config.as_deref()).context("reading the configuration")?;
    if matches!(cli.command, Command::Outlook { .. } | Command::User { .. })
        && std::env::var_os("CRM_LOG").is_none()
    {
        init_logs("warn");
    } else {
        init_logs(&config.log);
    }
    match cli.command {
        Command::Migrate => {
            let db = crm_host::app::open_database(&config).await?;
            for module in linked_modules(&config) {
                module
                    .migrate(&db)
                    .await
                    .with_context(|| format!("migrating module {}", module.manifest().id))?;
            }
            println!("migrations applied");
            Ok(())
        }
        Command::User {
            command:
                UserCommand::Add {
                    email,
                    operator,
                    name,
                },
        } => {
            config.database_url = crm_host::cli::existing_database_url(&config)?;
            let db = crm_host::app::open_database(&config).await?;
            let password = crm_host::cli::read_password()?;
            let id =
                crm_host::cli::add_user(&db, &email, name.as_deref(), &password, operator).await?;
            println!(
                "user {id} {} added{}; they can sign in now",
                email.trim().to_lowercase(),
                if operator { " as an operator" } else { "" }
            );
            Ok(())
        }
        Command::Outlook { command } => {
            config.database_url = crm_host::cli::existing_database_url(&config)?;
            let key = cli_sealing_key(&config)?;
            let module = Arc::new(microsoft_outlook::OutlookModule::new());
            let assembled = crm_host::app::assemble(
                &config,
                HostOptions {
                    modules: vec![module.clone()],
                    clock: Arc::new(SystemClock),
                    sealing_key: key,
                    extra_routes: Vec::new(),
                },
            )
            .await?;
            let entry = assembled
                .registry
                .get("microsoft_outlook")
                .context("the module is not linked")?;
            entry.module.migrate(&assembled.db).await?;
            let ctx = &entry.ctx;
            match command {
                OutlookCommand::Status { json } => {
                    let rows = microsoft_outlook::web::status::all(ctx).await?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&rows)?);
                    } else {
                        print!("{}", microsoft_outlook::web::status::table(&rows));
                    }
                }
                OutlookCommand::Refresh { mailbox, all: _ } => {
                    if let Some(id) = mailbox {
                        let known = microsoft_outlook::web::status::all(ctx).await?;
                        if !known.iter().any(|row| row.id == id) {
                            anyhow::bail!(
                                "there is no mail server with id {id}; `crm-host outlook status` lists them"
                            );
                        }
                    }
                    let shared = module.shared();
                    let options = microsoft_outlook::jobs::RefreshOptions {
                        // Asked for now: refresh even what was refreshed recently.
                        max_jitter: std::time::Duration::ZERO,
                        skip_refreshed_within: std::time::Duration::ZERO,
                        ..Default::default()
                    };
                    let summary =
                        microsoft_outlook::jobs::refresh_all(ctx, &shared, mailbox, &options)
                            .await?;
                    println!("{summary}");
                    for row in microsoft_outlook::web::status::all(ctx).await? {
                        if mailbox.is_none_or(|m| m == row.id) {
                            println!(
                                "  {} {}: {}{}",
                                row.id,
                                row.mailbox,
                                row.status,
                                row.last_error
                                    .map(|e| format!(" — {e}"))
                                    .unwrap_or_default()
                            );
                        }
                    }
                    if summary.failed > 0 || summary.needs_reconnect > 0 {
                        std::process::exit(1);
                    }
                }
            }
            Ok(())
        }
        Command::Serve => {
            let key = sealing_key(&config)?;
            let modules = linked_modules(&config);
            let app = Application::build(
                config,
                HostOptions {
                    modules,
                    clock: Arc::new(SystemClock),
                    sealing_key: key,
                    extra_routes: Vec::new(),
                },
            )
            .await?;
            app.run_until_stopped().await?;
            Ok(())
        }
        Command::Demo { bind } => {
            let dir = PathBuf::from("data");
            let key = crm_host::demo::prepare_data_dir(&dir)?;
            config.bind = bind;
            if std::env::var_os("CRM_DATABASE_URL").is_none() {
                config.database_url = "sqlite://data/crm.db?mode=rwc".into();
            }
            let db = crm_host::app::open_database(&config).await?;
            crm_host::demo::restrict_database_file(&dir.join("crm.db"))?;
            let seeded = crm_host::seed::seed_demo(&db).await?;
            for module in linked_modules(&config) {
                module.migrate(&db).await?;
            }
            let public = config.public_base_url().map_err(anyhow::Error::msg)?;
            let simulated =
                crm_host::demo::start(&db, &crm_sdk::Sealer::new(&key), &public).await?;
            drop(db);
            let mut extra_routes: Vec<crm_host::app::ExtraRoutes> = Vec::new();
            if let Some(services) = simulated.clone() {
                extra_routes.push(Arc::new(crm_host::demo::routes(services)));
            }
            let app = Application::build(
                config.clone(),
                HostOptions {
                    modules: linked_modules(&config),
                    clock: Arc::new(SystemClock),
                    sealing_key: key,
                    extra_routes,
                },
            )
            .await?;
            if seeded {
                app.state().registry.enable("microsoft_outlook").await?;
            }
            let url = format!("http://127.0.0.1:{}", app.port());
            println!("\nCRM demo running at {url}  (health: {url}/health)");
            println!("Sign in as:");
            for login in crm_host::seed::DEMO_LOGINS.iter() {
                println!(
                    "  {:<24} password {:<14} {}",
                    login.email,
                    login.password,
                    if login.is_admin { "(operator)" } else { "" }
                );
            }
            match &simulated {
                Some(services) => {
                    println!(
                        "No Azure app is configured: the simulated Microsoft services run on loopback"
                    );
                    println!(
                        "  identity platform {}   SMTP submission localhost:{}   Microsoft Graph {}",
                        services.idp.authority_url(),
                        services.smtp.port(),
                        services.graph.base_url()
                    );
                    println!(
                        "Try it: sign in as the operator, open Outgoing mail servers › {} ({}) › Connect,",
                        crm_host::demo::DEMO_SERVER_NAME,
                        crm_host::demo::DEMO_MAILBOX
                    );
                    println!(
                        "accept at the simulated Microsoft page, then send a mail from a contact and see it at {url}/demo/received"
                    );
                    println!(
                        "{} sends the same mail through the simulated Microsoft Graph (Connect it, then make it the default).",
                        crm_host::demo::DEMO_GRAPH_SERVER_NAME
                    );
                }
                None => println!(
                    "The module is configured for a real Azure app; no simulated services were started."
                ),
            }
            println!("Data lives in ./data (SQLite + sealing key). Ctrl-C stops.\n");
            app.run_until_stopped().await?;
            Ok(())
        }
    }
}
