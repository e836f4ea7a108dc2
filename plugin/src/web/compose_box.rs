//! The compose box on a record: the form (To, Cc, Subject, a Markdown message, files), its
//! errors beside the fields with everything typed kept, and the multipart upload it posts.
//! `compose.js` sends it without leaving the page and updates the mails' statuses in place.

use actix_multipart::Multipart;
use crm_sdk::{CurrentUser, FieldError, RecordRef};
use futures::StreamExt;
use maud::{Markup, html};

use crate::outbox::attachments::{Upload, size_words};
use crate::outbox::compose::{AddressInput, MailRequest};
use crate::web::layout::csrf;

/// Where the compose script is served.
pub const COMPOSE_SCRIPT_PATH: &str = "/microsoft_outlook/assets/compose.js";
/// The compose script (served as a file: the Content-Security-Policy allows no inline script).
pub const COMPOSE_SCRIPT: &str = include_str!("../assets/compose.js");

/// The longest text field read from an upload form, in bytes (beyond any text limit).
const MAX_TEXT_FIELD: usize = 64 * 1024 * 1024;

/// What the author typed, to put back in the form after a refusal.
#[derive(Debug, Clone, Default)]
pub struct Typed {
    pub to: String,
    pub cc: String,
    pub subject: String,
    pub body: String,
    /// The names of the files that were attached (a browser cannot refill a file input).
    pub files: Vec<String>,
}

impl Typed {
    /// A fresh form addressed to `to`.
    pub fn to(to: &str) -> Self {
        Self {
            to: to.into(),
            ..Self::default()
        }
    }

    /// The typed fields of a request.
    pub fn of(request: &MailRequest) -> Self {
        let list = |a: &AddressInput| match a {
            AddressInput::One(s) => s.clone(),
            AddressInput::Many(v) => v.join(", "),
        };
        Self {
            to: list(&request.to),
            cc: list(&request.cc),
            subject: request.subject.clone(),
            body: request
                .markdown_body
                .clone()
                .unwrap_or_else(|| request.text_body.clone()),
            files: request
                .uploads
                .iter()
                .map(|u| u.filename.clone())
                .chain(request.attachments.iter().map(|a| a.filename.clone()))
                .collect(),
        }
    }
}

/// The fields the form shows errors beside; others go above the Send button.
const FORM_FIELDS: [&str; 5] = ["to", "cc", "subject", "markdown_body", "attachments"];

/// The label of a field in errors shown away from it.
pub fn field_label(field: &str) -> &str {
    match field {
        "to" => "To",
        "cc" => "Cc",
        "bcc" => "Bcc",
        "subject" => "Subject",
        "markdown_body" | "text_body" | "html_body" => "Message",
        "attachments" => "Files",
        "reply_to" => "Reply-To",
        "from" => "From",
        "server" => "Mail server",
        "record" => "Record",
        _ => "The mail",
    }
}

/// The compose form of `record`, filled with `typed`, each error beside its field.
pub fn compose_form(
    user: &CurrentUser,
    record: &RecordRef,
    action: &str,
    typed: &Typed,
    errors: &[FieldError],
) -> Markup {
    let error = |field: &str| {
        let messages: Vec<&str> = errors
            .iter()
            .filter(|e| {
                e.field == field || (field == "markdown_body" && e.field.ends_with("_body"))
            })
            .map(|e| e.message.as_str())
            .collect();
        html! {
            p.error role="alert" data-error-for=(field) hidden[messages.is_empty()] {
                @for (i, m) in messages.iter().enumerate() { @if i > 0 { br; } (m) }
            }
        }
    };
    let general: Vec<&FieldError> = errors
        .iter()
        .filter(|e| !FORM_FIELDS.contains(&e.field.as_str()) && !e.field.ends_with("_body"))
        .collect();
    html! {
        form.compose method="post" action=(action) enctype="multipart/form-data" data-compose
            data-mails=(format!("#mails-{}-{}", record.model, record.id)) novalidate {
            (csrf(user))
            label for="mail-to" { "To" }
            input #mail-to name="to" value=(typed.to) autocomplete="off" aria-describedby="mail-to-help";
            p.help #mail-to-help { "Separate several addresses with commas." }
            (error("to"))
            label for="mail-cc" { "Cc" }
            input #mail-cc name="cc" value=(typed.cc) autocomplete="off";
            (error("cc"))
            label for="mail-subject" { "Subject" }
            input #mail-subject name="subject" value=(typed.subject);
            (error("subject"))
            label for="mail-body" { "Message" }
            textarea #mail-body name="markdown_body" rows="8" aria-describedby="mail-body-help" { (typed.body) }
            p.help #mail-body-help { "Formatting: **bold**, *italic*, - lists, [a link](https://example.com). It is sent as formatted text and as plain text." }
            (error("markdown_body"))
            label for="mail-files" { "Files" }
            input #mail-files type="file" name="attachments" multiple;
            @if !typed.files.is_empty() {
                p.help.files-again { "Attach again: " (typed.files.join(", ")) " (a refused form cannot keep files)." }
            }
            (error("attachments"))
            div.error role="alert" data-error-for="general" hidden[general.is_empty()] {
                @for e in &general { p { strong { (field_label(&e.field)) ": " } (e.message) } }
            }
            p { button type="submit" { "Send" } }
            p.flash.ok role="status" data-compose-status hidden {}
        }
        script src=(COMPOSE_SCRIPT_PATH) defer {}
    }
}

/// Reads the compose form's multipart upload: its text fields and its files (a part named
/// `attachments` with a filename), and what went wrong reading it. Reading stops keeping files
/// once they pass `max_file_bytes` together; the error then names the file that crossed it.
pub async fn read_upload(form: Multipart, max_file_bytes: usize) -> (MailRequest, Vec<FieldError>) {
    let mut request = MailRequest::default();
    let errors = match read_parts(form, max_file_bytes, &mut request).await {
        Ok(None) => Vec::new(),
        Ok(Some(e)) | Err(e) => vec![e],
    };
    (request, errors)
}

async fn read_parts(
    mut form: Multipart,
    max_file_bytes: usize,
    request: &mut MailRequest,
) -> Result<Option<FieldError>, FieldError> {
    let mut files_total = 0usize;
    let mut over: Option<FieldError> = None;
    while let Some(part) = form.next().await {
        let mut part = part.map_err(upload_error)?;
        let name = part.name().unwrap_or("").to_string();
        let filename = part
            .content_disposition()
            .and_then(|d| d.get_filename())
            .map(str::to_string);
        let content_type = part.content_type().map(|m| m.essence_str().to_string());
        let mut bytes = Vec::new();
        while let Some(chunk) = part.next().await {
            let chunk = chunk.map_err(upload_error)?;
            if filename.is_some() {
                files_total += chunk.len();
                if over.is_some() || files_total > max_file_bytes {
                    if over.is_none() {
                        over = Some(FieldError {
                            field: "attachments".into(),
                            message: format!(
                                "\"{}\" brings the attachments over {}, the limit per mail",
                                filename.as_deref().unwrap_or(""),
                                size_words(max_file_bytes)
                            ),
                        });
                    }
                    continue;
                }
            } else if bytes.len() + chunk.len() > MAX_TEXT_FIELD {
                return Err(FieldError {
                    field: name,
                    message: "This field is too long".into(),
                });
            }
            bytes.extend_from_slice(&chunk);
        }
        match (name.as_str(), filename) {
            ("attachments", Some(filename)) => {
                if filename.is_empty() && bytes.is_empty() {
                    continue; // the file input left empty
                }
                if over.is_none() {
                    request.uploads.push(Upload {
                        filename,
                        content_type,
                        bytes,
                    });
                }
            }
            (_, _) => {
                let text = String::from_utf8(bytes).map_err(|_| FieldError {
                    field: name.clone(),
                    message: "This field is not UTF-8 text".into(),
                })?;
                match name.as_str() {
                    "to" => request.to = AddressInput::One(text),
                    "cc" => request.cc = AddressInput::One(text),
                    "bcc" => request.bcc = AddressInput::One(text),
                    "subject" => request.subject = text,
                    "markdown_body" => request.markdown_body = Some(text),
                    "text_body" => request.text_body = text,
                    "html_body" => request.html_body = Some(text).filter(|h| !h.trim().is_empty()),
                    "reply_to" => request.reply_to = Some(text).filter(|r| !r.trim().is_empty()),
                    _ => {}
                }
            }
        }
    }
    Ok(over)
}

fn upload_error(e: actix_multipart::MultipartError) -> FieldError {
    FieldError {
        field: "attachments".into(),
        message: format!("The upload could not be read ({e}); nothing was queued. Send it again."),
    }
}
