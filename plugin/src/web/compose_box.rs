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
    max_file_bytes: usize,
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
            data-mails=(format!("#mails-{}-{}", record.model, record.id))
            data-max-file-bytes=(max_file_bytes) novalidate {
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

/// How much of an upload is read, in bytes.
#[derive(Debug, Clone, Copy)]
pub struct UploadLimits {
    /// The files together (`max_attachments_mb`).
    pub files: usize,
    /// Each text field (`max_message_kb`).
    pub text: usize,
}

impl UploadLimits {
    /// The most read of one request: the files, the text fields, and 1 MB of framing. Past it
    /// reading stops (a longer body is not drained: the request is refused unread).
    fn read_cap(self) -> usize {
        self.files
            .saturating_add(self.text.saturating_mul(2))
            .saturating_add(1_000_000)
    }
}

/// A refusal of an upload: what went wrong and the status to answer.
#[derive(Debug, Clone)]
pub struct UploadRefusal {
    /// 400 (unreadable) or 413 (over a limit).
    pub status: actix_web::http::StatusCode,
    /// The problem, against its field.
    pub error: FieldError,
}

/// Reads the compose form's multipart upload: its text fields and its files (a part named
/// `attachments` with a filename), and what went wrong reading it. Files stop being kept once
/// they pass `limits.files` together (the error names the file that crossed it), a text field
/// past `limits.text` is refused, and nothing is read past [`UploadLimits::read_cap`].
pub async fn read_upload(
    form: Multipart,
    limits: UploadLimits,
) -> (MailRequest, Option<UploadRefusal>) {
    let mut request = MailRequest::default();
    let refusal = read_parts(form, limits, &mut request).await;
    (request, refusal)
}

fn too_large(field: &str, message: String) -> UploadRefusal {
    UploadRefusal {
        status: actix_web::http::StatusCode::PAYLOAD_TOO_LARGE,
        error: FieldError {
            field: field.into(),
            message,
        },
    }
}

async fn read_parts(
    mut form: Multipart,
    limits: UploadLimits,
    request: &mut MailRequest,
) -> Option<UploadRefusal> {
    let (mut files_total, mut read) = (0usize, 0usize);
    let mut refusal: Option<UploadRefusal> = None;
    while let Some(part) = form.next().await {
        let mut part = match part {
            Ok(part) => part,
            Err(e) => return refusal.or(Some(upload_error(e))),
        };
        let name = part.name().unwrap_or("").to_string();
        let filename = part
            .content_disposition()
            .and_then(|d| d.get_filename())
            .map(str::to_string);
        let content_type = part.content_type().map(|m| m.essence_str().to_string());
        let mut bytes = Vec::new();
        let mut keep = true;
        while let Some(chunk) = part.next().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(e) => return refusal.or(Some(upload_error(e))),
            };
            read += chunk.len();
            if read > limits.read_cap() {
                let why = format!(
                    "The form is over {}; nothing was queued",
                    size_words(limits.read_cap())
                );
                return refusal.or(Some(too_large("attachments", why)));
            }
            if let Some(filename) = &filename {
                files_total += chunk.len();
                if keep && files_total > limits.files {
                    keep = false;
                    if refusal.is_none() {
                        refusal = Some(too_large(
                            "attachments",
                            format!(
                                "\"{filename}\" brings the attachments over {}, the limit per mail",
                                size_words(limits.files)
                            ),
                        ));
                    }
                }
            } else if keep && bytes.len() + chunk.len() > limits.text {
                keep = false;
                if refusal.is_none() {
                    let why = format!("This field is over {}", size_words(limits.text));
                    refusal = Some(too_large(&name, why));
                }
            }
            if keep && (filename.is_none() || refusal.is_none()) {
                bytes.extend_from_slice(&chunk);
            }
        }
        if !keep || (refusal.is_some() && filename.is_some()) {
            continue;
        }
        match (name.as_str(), filename) {
            ("attachments", Some(filename)) => {
                if !(filename.is_empty() && bytes.is_empty()) {
                    request.uploads.push(Upload {
                        filename,
                        content_type,
                        bytes,
                    });
                }
            }
            (_, _) => match String::from_utf8(bytes) {
                Ok(text) => set_field(request, &name, text),
                Err(_) => {
                    refusal = refusal.or(Some(UploadRefusal {
                        status: actix_web::http::StatusCode::BAD_REQUEST,
                        error: FieldError {
                            field: name,
                            message: "This field is not UTF-8 text".into(),
                        },
                    }));
                }
            },
        }
    }
    refusal
}

fn set_field(request: &mut MailRequest, name: &str, text: String) {
    match name {
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

fn upload_error(e: actix_multipart::MultipartError) -> UploadRefusal {
    UploadRefusal {
        status: actix_web::http::StatusCode::BAD_REQUEST,
        error: FieldError {
            field: "attachments".into(),
            message: format!(
                "The upload could not be read ({e}); nothing was queued. Send it again."
            ),
        },
    }
}
