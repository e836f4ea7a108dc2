//! Files attached to a mail: as uploaded by the compose form (multipart) or given in the JSON
//! API (base64), checked before anything is queued, and built into MIME parts that carry the
//! bytes unchanged (base64 transfer encoding, filename per RFC 2231).

use base64::Engine;
use crm_sdk::FieldError;
use lettre::message::header::{ContentDisposition, ContentTransferEncoding, ContentType};
use lettre::message::{Body, SinglePart};
use serde::Deserialize;

/// The default total of a mail's files, in bytes: 25 MB. Base64 grows a file by a third (and
/// its line breaks by 2 in 78), so 25 MB of files make about 34.2 MB of message, within
/// Exchange Online's 35 MB (`SIZE 35882577`).
pub const DEFAULT_MAX_ATTACHMENT_BYTES: usize = 25_000_000;

/// At most this many files per mail.
pub const MAX_FILES: usize = 100;

/// The longest filename accepted, in characters.
const MAX_FILENAME_CHARS: usize = 255;

/// A file in the JSON API: `{"filename", "content_type"?, "content_base64"}`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct AttachmentInput {
    /// The name the recipient sees (any Unicode; paths are cut to their last part).
    pub filename: String,
    /// A MIME type such as `application/pdf`; guessed from the filename when absent.
    #[serde(default)]
    pub content_type: Option<String>,
    /// The file's bytes in standard base64 (RFC 4648 §4; whitespace ignored).
    pub content_base64: String,
}

/// A file as received, before checks.
#[derive(Debug, Clone, Default)]
pub struct Upload {
    /// The name given by the browser or the API.
    pub filename: String,
    /// The type given by the browser or the API, if any.
    pub content_type: Option<String>,
    /// The bytes.
    pub bytes: Vec<u8>,
}

/// A checked file, ready to be built into the message.
#[derive(Debug, Clone)]
pub struct Attachment {
    /// The filename as sent (last path part, trimmed).
    pub filename: String,
    /// The MIME type as sent.
    pub content_type: ContentType,
    /// The bytes, unchanged.
    pub bytes: Vec<u8>,
}

impl Attachment {
    /// The MIME part: `Content-Disposition: attachment` with the RFC 2231 filename, base64.
    pub fn into_part(self) -> SinglePart {
        let disposition = ContentDisposition::attachment(&self.filename);
        let body = Body::new_with_encoding(self.bytes, ContentTransferEncoding::Base64)
            .unwrap_or_else(Body::new);
        SinglePart::builder()
            .header(self.content_type)
            .header(disposition)
            .body(body)
    }
}

/// `n` bytes in words: "512 bytes", "48 KB", "3.1 MB" (decimal units, as mail clients show).
pub fn size_words(n: usize) -> String {
    match n {
        0..1_000 => format!("{n} bytes"),
        1_000..1_000_000 => format!("{} KB", n / 1_000),
        _ => format!("{:.1} MB", n as f64 / 1_000_000.0),
    }
}

fn err(message: String) -> FieldError {
    FieldError {
        field: "attachments".into(),
        message,
    }
}

/// The base64 of the JSON API decoded, each file named in its error.
pub fn decode(inputs: &[AttachmentInput], errors: &mut Vec<FieldError>) -> Vec<Upload> {
    let mut out = Vec::with_capacity(inputs.len());
    for (i, input) in inputs.iter().enumerate() {
        let compact: String = input
            .content_base64
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .collect();
        match base64::engine::general_purpose::STANDARD.decode(compact.as_bytes()) {
            Ok(bytes) => out.push(Upload {
                filename: input.filename.clone(),
                content_type: input.content_type.clone(),
                bytes,
            }),
            Err(_) => errors.push(err(format!(
                "File {} (\"{}\") is not valid base64 in content_base64",
                i + 1,
                input.filename.trim()
            ))),
        }
    }
    out
}

/// The last part of a path a browser or client may send (`C:\fakepath\a.pdf`, `../a.pdf`).
fn base_name(name: &str) -> &str {
    name.rsplit(['/', '\\']).next().unwrap_or(name).trim()
}

/// The type given when it parses as a MIME type other than the generic one; else the type of
/// the filename's extension; else `application/octet-stream`. Only a label for the recipient:
/// the module never opens, runs or renders a file.
fn content_type_of(filename: &str, given: Option<&str>) -> ContentType {
    // A container type would make the file's bytes a MIME structure of their own (and base64
    // is not allowed on them, RFC 2045 §6.4): such a file goes as opaque bytes.
    let given = given
        .map(str::trim)
        .filter(|t| !t.is_empty() && !t.eq_ignore_ascii_case("application/octet-stream"))
        .filter(|t| {
            let t = t.to_ascii_lowercase();
            !t.starts_with("multipart/") && !t.starts_with("message/")
        })
        .and_then(|t| ContentType::parse(t).ok());
    given.unwrap_or_else(|| {
        let guess = mime_guess::from_path(filename).first_or_octet_stream();
        ContentType::parse(guess.essence_str())
            .unwrap_or_else(|_| ContentType::parse("application/octet-stream").expect("static"))
    })
}

/// Checks `uploads`: each has a usable name, there are at most [`MAX_FILES`], and together
/// they stay within `max_total` bytes (the error names the file that crosses it).
pub fn check(
    uploads: Vec<Upload>,
    max_total: usize,
    errors: &mut Vec<FieldError>,
) -> Vec<Attachment> {
    if uploads.len() > MAX_FILES {
        errors.push(err(format!(
            "{} files: at most {MAX_FILES} can be attached to one mail",
            uploads.len()
        )));
        return Vec::new();
    }
    let mut total = 0usize;
    let mut out = Vec::with_capacity(uploads.len());
    for (i, upload) in uploads.into_iter().enumerate() {
        let name = base_name(&upload.filename).to_string();
        if name.is_empty() {
            errors.push(err(format!("File {} has no name", i + 1)));
            continue;
        }
        if name.chars().any(char::is_control) {
            errors.push(err(format!(
                "The name of file {} must not contain line breaks or control characters",
                i + 1
            )));
            continue;
        }
        if name.chars().count() > MAX_FILENAME_CHARS {
            errors.push(err(format!(
                "The name of file {} is too long (at most {MAX_FILENAME_CHARS} characters)",
                i + 1
            )));
            continue;
        }
        total = total.saturating_add(upload.bytes.len());
        if total > max_total {
            errors.push(err(format!(
                "\"{name}\" ({}) brings the attachments to {}; the limit is {} per mail",
                size_words(upload.bytes.len()),
                size_words(total),
                size_words(max_total)
            )));
            return out;
        }
        let content_type = content_type_of(&name, upload.content_type.as_deref());
        out.push(Attachment {
            filename: name,
            content_type,
            bytes: upload.bytes,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upload(name: &str, len: usize, ty: Option<&str>) -> Upload {
        Upload {
            filename: name.into(),
            content_type: ty.map(Into::into),
            bytes: vec![7; len],
        }
    }

    #[test]
    fn names_the_file_that_crosses_the_limit_and_cuts_paths() {
        let mut errors = Vec::new();
        let files = check(
            vec![
                upload("C:\\fakepath\\quote.pdf", 600, None),
                upload("../../etc/contract.docx", 600, Some("text/html")),
            ],
            1_000,
            &mut errors,
        );
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].filename, "quote.pdf");
        assert_eq!(
            files[0].content_type,
            ContentType::parse("application/pdf").expect("pdf")
        );
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].message.contains("\"contract.docx\""),
            "{}",
            errors[0].message
        );
        assert!(
            errors[0].message.contains("the limit is 1 KB"),
            "{}",
            errors[0].message
        );
    }

    #[test]
    fn refuses_nameless_and_control_character_names_and_bad_base64() {
        let mut errors = Vec::new();
        check(
            vec![upload("  ", 1, None), upload("a\r\nb.txt", 1, None)],
            1_000,
            &mut errors,
        );
        assert_eq!(errors.len(), 2);
        let mut errors = Vec::new();
        let decoded = decode(
            &[
                AttachmentInput {
                    filename: "ok.bin".into(),
                    content_type: None,
                    content_base64: "AAEC\n/w==".into(),
                },
                AttachmentInput {
                    filename: "bad.bin".into(),
                    content_type: None,
                    content_base64: "not base64!".into(),
                },
            ],
            &mut errors,
        );
        assert_eq!(decoded.len(), 1);
        assert_eq!(decoded[0].bytes, [0, 1, 2, 255]);
        assert!(errors[0].message.contains("bad.bin"));
    }

    #[test]
    fn a_given_type_wins_over_the_extension_and_garbage_is_ignored() {
        assert_eq!(
            content_type_of("x.bin", Some("image/png")),
            ContentType::parse("image/png").expect("png")
        );
        assert_eq!(
            content_type_of("notes.txt", Some("not a type")),
            ContentType::parse("text/plain").expect("txt")
        );
        assert_eq!(
            content_type_of("blob", None),
            ContentType::parse("application/octet-stream").expect("bin")
        );
    }
}
