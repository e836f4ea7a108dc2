//! Mail as CRM users write it: files through the compose form's upload and the JSON API,
//! Markdown sent as `multipart/alternative`, sent HTML shown only sanitised, and refusals that
//! name the field and keep what was typed.

use crate::send::{mailing, mails_path, settings, wait_status};
use base64::Engine;
use mail_parser::{MessageParser, MimeHeaders, PartType};
use microsoft_outlook::entities::outbox;
use reqwest::StatusCode;
use sea_orm::{EntityTrait, PaginatorTrait};
use serde_json::json;

/// A PDF-like binary: a PDF header, then every byte value, CR and LF alone and NULs.
fn pdf_like(len: usize) -> Vec<u8> {
    let mut bytes = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n".to_vec();
    bytes.extend((0..len).map(|i| (i * 7 % 256) as u8));
    bytes.extend_from_slice(b"\r\n\r.\r\n\0\0%%EOF\n");
    bytes
}

const NON_ASCII_NAME: &str = "Angebot für Müller – Größe ½.txt";

fn notes() -> Vec<u8> {
    "Zeile eins\nligne deux: café\r\n.\nthree\n"
        .as_bytes()
        .to_vec()
}

/// The message the sink received with `message_id`, parsed.
fn received(smtp: &microsoft_simulators::smtp::SmtpServer, message_id: &str) -> Vec<u8> {
    smtp.received()
        .into_iter()
        .find(|r| r.message_id.as_deref() == Some(message_id))
        .expect("the mail reached the server")
        .data
}

/// The files of a message: (filename, content type, decoded bytes).
fn files_of(data: &[u8]) -> Vec<(String, String, Vec<u8>)> {
    let message = MessageParser::default().parse(data).expect("MIME parses");
    message
        .attachments()
        .map(|p| {
            let ty = p
                .content_type()
                .map(|t| format!("{}/{}", t.ctype(), t.subtype().unwrap_or("")))
                .unwrap_or_default();
            (
                p.attachment_name().unwrap_or("").to_string(),
                ty,
                p.contents().to_vec(),
            )
        })
        .collect()
}

async fn outbox_count(app: &crate::helpers::TestApp) -> u64 {
    outbox::Entity::find().count(&app.db).await.expect("count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_files_from_the_form_and_from_the_api_arrive_byte_identical() {
    let m = mailing().await;
    let pdf = pdf_like(300_000);
    // The compose form's upload, as a browser without script posts it.
    let (status, page, location) = m
        .alice
        .post_upload(
            &mails_path(m.contact),
            &[
                ("to", "Dana <dana@fabrikam.example>"),
                ("subject", "Quote and notes"),
                ("markdown_body", "Hello Dana, the **quote** is attached."),
            ],
            &[
                ("Quote 2026-118.pdf", "application/pdf", pdf.clone()),
                (NON_ASCII_NAME, "text/plain", notes()),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER, "{page}");
    let location = location.expect("redirect");
    let (_, list, _) = m.alice.get(&location).await;
    assert!(
        list.contains("Queued — it will go out from"),
        "the author is told where it goes out from\n{list}"
    );
    // The JSON API: base64, no content type for one file (guessed from its name).
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let (status, body) = m
        .alice
        .post_json(
            &mails_path(m.contact),
            &json!({
                "to": ["dana@fabrikam.example"],
                "subject": "Same files by the API",
                "text_body": "Attached.",
                "attachments": [
                    {"filename": "Quote 2026-118.pdf", "content_base64": b64(&pdf)},
                    {"filename": NON_ASCII_NAME, "content_type": "text/plain", "content_base64": b64(&notes())},
                ],
            }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert!(
        body["confirmation"]
            .as_str()
            .is_some_and(|c| c.starts_with("Queued — it will go out from")),
        "{body}"
    );
    let api_id = body["id"].as_i64().expect("id");
    let api_mail = wait_status(&m.env.app, api_id, "sent").await;
    let (_, mails) = m.alice.get_json(&mails_path(m.contact)).await;
    let form_mail = mails
        .as_array()
        .expect("list")
        .iter()
        .find(|v| v["subject"] == "Quote and notes")
        .expect("the form's mail");
    let form_mail = wait_status(&m.env.app, form_mail["id"].as_i64().expect("id"), "sent").await;
    for mail in [&form_mail, &api_mail] {
        let files = files_of(&received(&m.smtp, &mail.message_id));
        assert_eq!(files.len(), 2, "{}", mail.subject);
        assert_eq!(files[0].0, "Quote 2026-118.pdf");
        assert_eq!(files[0].1, "application/pdf");
        assert!(files[0].2 == pdf, "the PDF's bytes are unchanged");
        assert_eq!(files[1].0, NON_ASCII_NAME, "RFC 2231 name decoded");
        assert_eq!(
            files[1].2,
            notes(),
            "the text file's bytes, line ends included"
        );
    }
    let raw = String::from_utf8_lossy(&received(&m.smtp, &api_mail.message_id)).to_string();
    assert!(
        raw.contains("filename*"),
        "the non-ASCII name goes per RFC 2231"
    );
    // The mail's page lists the files by name.
    let (_, page, _) = m
        .alice
        .get(&format!("/microsoft_outlook/outbox/{}", api_mail.id))
        .await;
    assert!(page.contains("Quote 2026-118.pdf"), "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_over_the_limit_are_refused_before_queueing_with_the_file_named() {
    let m = mailing().await;
    settings(
        &m.env,
        &[
            ("mailbox_rate_per_minute", "0"),
            ("max_attachments_mb", "1"),
        ],
    )
    .await;
    let before = outbox_count(&m.env.app).await;
    let b64 = |n: usize| base64::engine::general_purpose::STANDARD.encode(vec![1u8; n]);
    let (status, body) = m
        .alice
        .post_json(
            &mails_path(m.contact),
            &json!({
                "to": "dana@fabrikam.example",
                "subject": "Too big",
                "text_body": "x",
                "attachments": [
                    {"filename": "small.pdf", "content_base64": b64(600_000)},
                    {"filename": "second-scan.pdf", "content_base64": b64(600_000)},
                ],
            }),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let error = &body["errors"][0];
    assert_eq!(error["field"], "attachments");
    let message = error["message"].as_str().expect("message");
    assert!(message.contains("\"second-scan.pdf\""), "{message}");
    assert!(message.contains("1.0 MB"), "the limit is named: {message}");
    // The form's upload: refused while reading, the typed text kept in the form.
    let (status, page, _) = m
        .alice
        .post_upload(
            &mails_path(m.contact),
            &[
                ("to", "dana@fabrikam.example"),
                ("subject", "Scans for you"),
                ("markdown_body", "Here are the scans."),
            ],
            &[
                ("scan-1.pdf", "application/pdf", vec![2u8; 700_000]),
                ("scan-2.pdf", "application/pdf", vec![3u8; 700_000]),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(
        page.contains("&quot;scan-2.pdf&quot; brings the attachments over 1.0 MB"),
        "{page}"
    );
    assert!(page.contains("value=\"Scans for you\""), "{page}");
    assert!(page.contains("Here are the scans."), "{page}");
    assert_eq!(outbox_count(&m.env.app).await, before, "nothing was queued");
    assert_eq!(m.smtp.received_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn markdown_goes_as_plain_text_and_html_alternatives() {
    let m = mailing().await;
    let markdown = "# Quote\n\nDear Dana,\n\n- **Licences**: 12\n- *Support*: 1 year\n\nSee [the terms](https://contoso.example/terms).";
    let (status, body) = m
        .alice
        .post_json(
            &mails_path(m.contact),
            &json!({"to": "dana@fabrikam.example", "subject": "Formatted", "markdown_body": markdown}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let mail = wait_status(&m.env.app, body["id"].as_i64().expect("id"), "sent").await;
    let data = received(&m.smtp, &mail.message_id);
    let message = MessageParser::default().parse(&data).expect("parses");
    let root = message.root_part();
    let ty = root.content_type().expect("content type");
    assert_eq!(
        (ty.ctype(), ty.subtype()),
        ("multipart", Some("alternative"))
    );
    let text = message.body_text(0).expect("text part");
    assert!(text.contains("- **Licences**: 12"), "{text}");
    let html = match &message.html_part(0).expect("html part").body {
        PartType::Html(h) => h.to_string(),
        other => panic!("not an HTML part: {other:?}"),
    };
    assert!(html.contains("<h1>Quote</h1>"), "{html}");
    assert!(html.contains("<strong>Licences</strong>"), "{html}");
    assert!(
        html.contains("href=\"https://contoso.example/terms\""),
        "{html}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sent_html_is_shown_in_the_crm_only_sanitised() {
    let m = mailing().await;
    let hostile = r#"<p>Offer</p><script>alert(document.cookie)</script><img src="x" onerror="alert(1)"><a href="javascript:alert(2)" onmouseover="alert(3)">terms</a><iframe src="https://evil.example"></iframe><svg onload="alert(4)"></svg>"#;
    let (status, body) = m
        .alice
        .post_json(
            &mails_path(m.contact),
            &json!({"to": "dana@fabrikam.example", "subject": "HTML", "text_body": "Offer", "html_body": hostile}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = body["id"].as_i64().expect("id");
    let mail = wait_status(&m.env.app, id, "sent").await;
    // Sent as given: the module does not rewrite the author's HTML.
    let data = received(&m.smtp, &mail.message_id);
    let message = MessageParser::default().parse(&data).expect("parses");
    let sent = match &message.html_part(0).expect("html part").body {
        PartType::Html(h) => h.to_string(),
        other => panic!("not an HTML part: {other:?}"),
    };
    assert_eq!(sent.trim_end(), hostile, "the API's HTML goes as given");
    for viewer in [&m.alice, &m.env.admin] {
        let (status, page, _) = viewer.get(&format!("/microsoft_outlook/outbox/{id}")).await;
        assert_eq!(status, StatusCode::OK);
        let card = page
            .split("id=\"message\"")
            .nth(1)
            .and_then(|rest| rest.split("id=\"headers\"").next())
            .expect("the message card");
        assert!(card.contains("Offer"), "{card}");
        for bad in [
            "<script",
            "onerror",
            "onmouseover",
            "onload",
            "javascript:",
            "<iframe",
        ] {
            assert!(
                !card.to_ascii_lowercase().contains(bad),
                "{bad} shown:\n{card}"
            );
        }
        let (_, json) = viewer
            .get_json(&format!("/microsoft_outlook/outbox/{id}"))
            .await;
        let shown = json["message"]["html_body"].as_str().expect("html");
        for bad in ["<script", "onerror", "javascript:"] {
            assert!(!shown.contains(bad), "{bad} in {shown}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_form_shows_each_error_beside_its_field_and_keeps_the_text() {
    let m = mailing().await;
    let before = outbox_count(&m.env.app).await;
    let (status, page, _) = m
        .alice
        .post_upload(
            &mails_path(m.contact),
            &[
                ("to", "dana@fabrikam.example, bob@"),
                ("subject", "Our offer <3"),
                ("markdown_body", "Dear Dana,\n\nthe *offer* & terms."),
            ],
            &[("offer.pdf", "application/pdf", pdf_like(1_000))],
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let to_error = page
        .split("data-error-for=\"to\"")
        .nth(1)
        .expect("an error beside To");
    assert!(
        to_error.starts_with(">Recipient &quot;bob@&quot; is not an e-mail address"),
        "{to_error}"
    );
    assert!(
        page.contains("value=\"dana@fabrikam.example, bob@\""),
        "{page}"
    );
    assert!(page.contains("value=\"Our offer &lt;3\""), "{page}");
    assert!(page.contains("the *offer* &amp; terms."), "{page}");
    assert!(page.contains("Attach again: offer.pdf"), "{page}");
    assert!(!page.contains("text_body"), "no raw field names\n{page}");
    // The script's way: JSON errors, per field, in words.
    let (status, body) = m
        .alice
        .post_json(
            &mails_path(m.contact),
            &json!({"to": "bob@", "subject": "", "markdown_body": "x"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let fields: Vec<&str> = body["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .filter_map(|e| e["field"].as_str())
        .collect();
    assert_eq!(fields, ["to", "subject"], "{body}");
    // An upload form without its CSRF token, or with another session's, is refused unread.
    for token in [None, Some("not-the-session-token")] {
        let mut form = reqwest::multipart::Form::new()
            .text("to", "dana@fabrikam.example")
            .text("subject", "Forged")
            .text("markdown_body", "x");
        if let Some(token) = token {
            form = form.text("csrf_token", token);
        }
        let response = m
            .alice
            .client
            .post(m.alice.url(&mails_path(m.contact)))
            .multipart(form)
            .send()
            .await
            .expect("POST");
        assert_eq!(response.status(), StatusCode::FORBIDDEN, "{token:?}");
    }
    assert_eq!(outbox_count(&m.env.app).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_record_shows_statuses_in_words_and_the_mailbox_it_goes_out_from() {
    let m = mailing().await;
    let id = crate::send::queue(&m, "Words check").await;
    wait_status(&m.env.app, id, "sent").await;
    let (_, page, _) = m.alice.get(&format!("/contacts/{}", m.contact)).await;
    let table = page
        .split("table class=\"mails cards\"")
        .nth(1)
        .expect("the record's mails");
    assert!(table.contains("Delivered to Exchange"), "{table}");
    assert!(
        table.contains(&format!("{} as Alice Adams", crate::connect::MAILBOX)),
        "sent via which mailbox, as whom\n{table}"
    );
    assert!(
        !table.contains("2.0.0") && !table.contains("Hostname="),
        "no raw SMTP reply on the record\n{table}"
    );
    // The raw reply stays on the mail's own page.
    let (_, detail, _) = m
        .alice
        .get(&format!("/microsoft_outlook/outbox/{id}"))
        .await;
    assert!(detail.contains("250"), "{detail}");
}

/// Requests that queue at the same moment are stored together (one transaction per group):
/// each request gets back its own mail, with its own text, and each goes out once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mails_queued_at_the_same_moment_each_get_their_own_row_and_text_and_go_out_once() {
    const MAILS: usize = 40;
    let m = mailing().await;
    let path = mails_path(m.contact);
    let answers = futures::future::join_all((0..MAILS).map(|i| {
        let (alice, path) = (&m.alice, &path);
        async move {
            let subject = format!("Concurrent {i}");
            let body = format!("Text number {i} for Dana");
            let (status, answer) = alice
                .post_json(
                    path,
                    &json!({"to": "dana@fabrikam.example", "subject": subject, "text_body": body}),
                )
                .await;
            assert_eq!(status, StatusCode::CREATED, "{answer}");
            (i, answer)
        }
    }))
    .await;
    let mut ids = std::collections::BTreeSet::new();
    for (i, answer) in &answers {
        let id = answer["id"].as_i64().expect("id");
        assert!(ids.insert(id), "mail {id} was answered to two requests");
        let mail = wait_status(&m.env.app, id, "sent").await;
        assert_eq!(
            mail.subject,
            format!("Concurrent {i}"),
            "request {i} got another's row"
        );
        assert_eq!(
            mail.message_id,
            answer["message_id"].as_str().expect("message_id")
        );
        let data = String::from_utf8(received(&m.smtp, &mail.message_id)).expect("text");
        assert!(
            data.contains(&format!("Subject: Concurrent {i}\r\n")),
            "{data}"
        );
        assert!(
            data.contains(&format!("Text number {i} for Dana")),
            "{data}"
        );
    }
    assert_eq!(outbox_count(&m.env.app).await, MAILS as u64);
    let received = m.smtp.received();
    assert_eq!(received.len(), MAILS, "each mail went out once");
}
