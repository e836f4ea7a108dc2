//! The `crm-host` binary as an operator runs it: start-up errors and the outlook CLI.

use crm_sdk::{Sealer, SealingKey};
use microsoft_outlook::entities::{mail_server, mailbox_health, token};
use sea_orm::{ActiveModelTrait, Set};
use secrecy::ExposeSecret;
use std::process::Command;

fn crm_host() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_crm-host"));
    cmd.env_remove("CRM_SEALING_KEY")
        .env_remove("CRM_SEALING_KEY_FILE")
        .env("RUST_BACKTRACE", "0");
    cmd
}

#[test]
fn serve_without_a_sealing_key_fails_with_a_clear_message() {
    let dir = std::env::temp_dir().join(format!("crm-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let out = crm_host()
        .current_dir(&dir)
        .env(
            "CRM_DATABASE_URL",
            format!("sqlite://{}/serve.db", dir.display()),
        )
        .env("CRM_BIND", "127.0.0.1:0")
        .arg("serve")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no sealing key"), "{err}");
    assert!(err.contains("CRM_SEALING_KEY"), "{err}");
}

#[tokio::test]
async fn outlook_status_json_lists_every_mail_server() {
    let dir = std::env::temp_dir().join(format!("crm-cli-status-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let url = format!("sqlite://{}/crm.db", dir.display());
    let key = SealingKey::generate();
    let key_text = key.to_base64().expose_secret().to_string();
    let run = |args: &[&str]| {
        crm_host()
            .current_dir(&dir)
            .env("CRM_DATABASE_URL", &url)
            .env("CRM_SEALING_KEY", &key_text)
            .args(args)
            .output()
            .expect("run")
    };
    let migrated = run(&["migrate"]);
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );

    let db = crm_host::db::connect(&url, 2).await.expect("db");
    let now = chrono::Utc::now();
    let server = mail_server::ActiveModel {
        name: Set("Office 365".into()),
        kind: Set("shared".into()),
        owner_user_id: Set(None),
        smtp_host: Set("smtp.office365.com".into()),
        smtp_port: Set(587),
        security: Set("starttls".into()),
        extra_ca_pem: Set(None),
        mailbox: Set("crm@contoso.example".into()),
        auth: Set("delegated".into()),
        transport: Set("smtp".into()),
        send_as: Set("author".into()),
        from_allow_list: Set(String::new()),
        is_default: Set(true),
        created_at: Set(now),
        updated_at: Set(now),
        ..Default::default()
    }
    .insert(&db)
    .await
    .expect("server");
    let other = mail_server::ActiveModel {
        mailbox: Set("alice@contoso.example".into()),
        kind: Set("personal".into()),
        owner_user_id: Set(Some(2)),
        is_default: Set(false),
        ..server.clone().into()
    };
    let mut other = other;
    other.id = sea_orm::ActiveValue::NotSet;
    other.insert(&db).await.expect("second server");
    let sealer = Sealer::new(&key);
    token::ActiveModel {
        server_id: Set(server.id),
        access_token_sealed: Set(sealer.seal("at", "x")),
        refresh_token_sealed: Set(None),
        access_expires_at: Set(now + chrono::Duration::minutes(70)),
        scopes: Set("https://outlook.office.com/SMTP.Send".into()),
        version: Set(3),
        status: Set("needs_reconnect".into()),
        signed_in_as: Set("crm@contoso.example".into()),
        connected_at: Set(now),
        last_refresh_at: Set(Some(now)),
        last_error: Set(Some("The grant was revoked (AADSTS50173)".into())),
        notified_at: Set(None),
        refresh_lease_until: Set(None),
        smtp_user: Set(None),
    }
    .insert(&db)
    .await
    .expect("token");
    // The dead grant held the mailbox.
    mailbox_health::ActiveModel {
        server_id: Set(server.id),
        state: Set("held".into()),
        reason: Set(Some("grant_dead".into())),
        detail: Set(Some(
            "The grant was revoked (AADSTS50173). The mailbox's user must click Reconnect.".into(),
        )),
        since: Set(Some(now)),
        until: Set(None),
        notified_at: Set(Some(now)),
        updated_at: Set(now),
    }
    .insert(&db)
    .await
    .expect("health");

    let out = run(&["outlook", "status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    let rows = rows.as_array().expect("a list");
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["mailbox"], "crm@contoso.example");
    assert_eq!(rows[0]["kind"], "shared");
    assert_eq!(rows[0]["status"], "held:grant_dead");
    assert_eq!(rows[0]["health"], "held");
    assert!(
        rows[0]["held_because"]
            .as_str()
            .unwrap_or_default()
            .contains("Reconnect")
    );
    assert!(
        rows[0]["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("AADSTS50173")
    );
    assert!(rows[0]["access_expires_at"].is_string());
    assert_eq!(rows[1]["status"], "not_connected");
    assert_eq!(rows[1]["health"], "ready");
    assert_eq!(rows[1]["kind"], "personal");

    let table = run(&["outlook", "status"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("MAILBOX") && text.contains("held"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}
