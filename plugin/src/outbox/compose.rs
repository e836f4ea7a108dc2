//! A mail as an author writes it, validated at the boundary: addresses parsed, no control
//! characters but tab in header fields and no NUL anywhere, at most 500 recipients, within the
//! size limit.

use crm_sdk::FieldError;
use lettre::message::header::ContentType;
use lettre::message::{Mailbox, Mailboxes, MultiPart, SinglePart};
use lettre::{Address, Message};
use serde::Deserialize;

/// Exchange Online's limit of recipients per message.
pub const MAX_RECIPIENTS: usize = 500;
/// The default size limit of a mail's text (subject and bodies), in bytes.
pub const DEFAULT_MAX_BYTES: usize = 10 * 1024 * 1024;

/// Addresses as posted: one string (comma-separated) or a JSON list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum AddressInput {
    /// `a@x, B <b@y>`.
    One(String),
    /// `["a@x", "B <b@y>"]`.
    Many(Vec<String>),
}

impl Default for AddressInput {
    fn default() -> Self {
        AddressInput::One(String::new())
    }
}

impl AddressInput {
    fn items(&self) -> Vec<&str> {
        match self {
            AddressInput::One(s) => vec![s.as_str()],
            AddressInput::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

/// A mail as posted by the form or the JSON API.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct MailRequest {
    #[serde(default)]
    pub to: AddressInput,
    #[serde(default)]
    pub cc: AddressInput,
    #[serde(default)]
    pub bcc: AddressInput,
    #[serde(default)]
    pub subject: String,
    #[serde(default)]
    pub text_body: String,
    #[serde(default)]
    pub html_body: Option<String>,
    #[serde(default)]
    pub reply_to: Option<String>,
}

/// A validated mail, not yet bound to a sender.
#[derive(Debug, Clone)]
pub struct OutgoingMail {
    pub to: Vec<Mailbox>,
    pub cc: Vec<Mailbox>,
    pub bcc: Vec<Mailbox>,
    pub subject: String,
    pub text_body: String,
    pub html_body: Option<String>,
    pub reply_to: Option<Mailbox>,
}

fn err(field: &str, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

/// Whether `text` may not go into a header field: C0 control characters other than tab (line
/// breaks, vertical tab, form feed, NUL, ESC, ...) and DEL.
pub fn unfit_for_header(text: &str) -> bool {
    text.chars()
        .any(|c| (c.is_ascii_control() && c != '\t') || c == '\u{7f}')
}

const UNFIT_FOR_HEADER: &str = "must not contain line breaks or control characters";
const NUL_IN_BODY: &str = "must not contain NUL characters";

fn parse_list(field: &str, input: &AddressInput, errors: &mut Vec<FieldError>) -> Vec<Mailbox> {
    let mut out = Vec::new();
    for item in input.items() {
        if item.trim().is_empty() {
            continue;
        }
        if unfit_for_header(item) {
            errors.push(err(field, UNFIT_FOR_HEADER));
            continue;
        }
        match item.parse::<Mailboxes>() {
            Ok(list) => out.extend(list),
            Err(_) => errors.push(err(
                field,
                format!("\"{}\" is not a valid address list (use name@example.com, separated by commas)", item.trim()),
            )),
        }
    }
    out
}

impl OutgoingMail {
    /// Validates a request; every problem is reported against its field.
    pub fn parse(request: &MailRequest, max_bytes: usize) -> Result<Self, Vec<FieldError>> {
        let mut errors = Vec::new();
        let to = parse_list("to", &request.to, &mut errors);
        let cc = parse_list("cc", &request.cc, &mut errors);
        let bcc = parse_list("bcc", &request.bcc, &mut errors);
        let total = to.len() + cc.len() + bcc.len();
        if errors.is_empty() && total == 0 {
            errors.push(err("to", "at least one recipient is required"));
        }
        if total > MAX_RECIPIENTS {
            errors.push(err(
                "to",
                format!("{total} recipients: Exchange Online accepts at most {MAX_RECIPIENTS} per message"),
            ));
        }
        let subject = request.subject.trim().to_string();
        if unfit_for_header(&request.subject) {
            errors.push(err("subject", UNFIT_FOR_HEADER));
        } else if subject.is_empty() {
            errors.push(err("subject", "is required"));
        } else if subject.chars().count() > 998 {
            errors.push(err("subject", "is too long (at most 998 characters)"));
        }
        let reply_to = match request
            .reply_to
            .as_deref()
            .map(str::trim)
            .filter(|r| !r.is_empty())
        {
            None => None,
            Some(_) if request.reply_to.as_deref().is_some_and(unfit_for_header) => {
                errors.push(err("reply_to", UNFIT_FOR_HEADER));
                None
            }
            Some(r) => match r.parse::<Mailbox>() {
                Ok(m) => Some(m),
                Err(_) => {
                    errors.push(err("reply_to", format!("\"{r}\" is not a valid address")));
                    None
                }
            },
        };
        let html_body = request.html_body.clone().filter(|h| !h.trim().is_empty());
        if request.text_body.contains('\0') {
            errors.push(err("text_body", NUL_IN_BODY));
        }
        if html_body.as_ref().is_some_and(|h| h.contains('\0')) {
            errors.push(err("html_body", NUL_IN_BODY));
        }
        if request.text_body.trim().is_empty() && html_body.is_none() {
            errors.push(err("text_body", "is required"));
        }
        let size =
            subject.len() + request.text_body.len() + html_body.as_ref().map_or(0, String::len);
        if size > max_bytes {
            errors.push(err(
                "text_body",
                format!(
                    "the mail is {} KB; the limit is {} KB",
                    size / 1024,
                    max_bytes / 1024
                ),
            ));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            to,
            cc,
            bcc,
            subject,
            text_body: request.text_body.clone(),
            html_body,
            reply_to,
        })
    }

    /// Every envelope recipient.
    pub fn recipients(&self) -> impl Iterator<Item = &Address> {
        self.to
            .iter()
            .chain(&self.cc)
            .chain(&self.bcc)
            .map(|m| &m.email)
    }

    /// Builds the message to send: From, optional Sender, a fixed Message-ID and Date.
    pub fn build(
        &self,
        from: Mailbox,
        sender: Option<Mailbox>,
        message_id: &str,
        date: std::time::SystemTime,
    ) -> Result<Message, lettre::error::Error> {
        let mut builder = Message::builder()
            .from(from)
            .subject(self.subject.clone())
            .message_id(Some(format!("<{message_id}>")))
            .date(date);
        if let Some(sender) = sender {
            builder = builder.sender(sender);
        }
        for m in &self.to {
            builder = builder.to(m.clone());
        }
        for m in &self.cc {
            builder = builder.cc(m.clone());
        }
        for m in &self.bcc {
            builder = builder.bcc(m.clone());
        }
        if let Some(r) = &self.reply_to {
            builder = builder.reply_to(r.clone());
        }
        let text = SinglePart::builder()
            .header(ContentType::TEXT_PLAIN)
            .body(self.text_body.clone());
        match &self.html_body {
            Some(html) => builder.multipart(
                MultiPart::alternative().singlepart(text).singlepart(
                    SinglePart::builder()
                        .header(ContentType::TEXT_HTML)
                        .body(html.clone()),
                ),
            ),
            None => builder.singlepart(text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(to: &str, subject: &str) -> MailRequest {
        MailRequest {
            to: AddressInput::One(to.into()),
            subject: subject.into(),
            text_body: "Hello".into(),
            ..MailRequest::default()
        }
    }

    fn fields(result: Result<OutgoingMail, Vec<FieldError>>) -> Vec<String> {
        result
            .err()
            .unwrap_or_default()
            .into_iter()
            .map(|e| e.field)
            .collect()
    }

    #[test]
    fn refuses_injection_bad_addresses_and_too_many() {
        assert!(
            OutgoingMail::parse(
                &request("Dana <dana@fabrikam.example>, evan@northwind.example", "Hi"),
                1024
            )
            .is_ok()
        );
        assert_eq!(
            fields(OutgoingMail::parse(
                &request("a@b.example", "Hi\r\nBcc: victim@x.example"),
                1024
            )),
            ["subject"]
        );
        assert_eq!(
            fields(OutgoingMail::parse(
                &request("a@b.example\r\nBcc: v@x.example", "Hi"),
                1024
            )),
            ["to"]
        );
        assert_eq!(
            fields(OutgoingMail::parse(&request("not an address", "Hi"), 1024)),
            ["to"]
        );
        let many: Vec<String> = (0..501).map(|i| format!("r{i}@x.example")).collect();
        let mut r = request("", "Hi");
        r.to = AddressInput::Many(many);
        assert_eq!(fields(OutgoingMail::parse(&r, 1 << 20)), ["to"]);
        let mut big = request("a@b.example", "Hi");
        big.text_body = "x".repeat(2048);
        assert_eq!(fields(OutgoingMail::parse(&big, 1024)), ["text_body"]);
    }

    #[test]
    fn refuses_control_characters_in_every_header_field_and_nul_anywhere() {
        for bad in ["\u{b}", "\u{c}", "\0", "\u{1b}[31m", "\r", "\n", "\u{7f}"] {
            assert_eq!(
                fields(OutgoingMail::parse(
                    &request("a@b.example", &format!("Hi{bad}there")),
                    1024
                )),
                ["subject"],
                "{bad:?}"
            );
            assert_eq!(
                fields(OutgoingMail::parse(
                    &request(&format!("Dana{bad} <a@b.example>"), "Hi"),
                    1024
                )),
                ["to"],
                "{bad:?}"
            );
            let mut r = request("a@b.example", "Hi");
            r.cc = AddressInput::Many(vec![format!("c{bad}@b.example")]);
            r.reply_to = Some(format!("r@b.example{bad}"));
            assert_eq!(
                fields(OutgoingMail::parse(&r, 1024)),
                ["cc", "reply_to"],
                "{bad:?}"
            );
        }
        assert!(OutgoingMail::parse(&request("a@b.example", "Tab\there"), 1024).is_ok());
        let mut r = request("a@b.example", "Hi");
        r.text_body = "Hello\0world".into();
        r.html_body = Some("<p>\0</p>".into());
        assert_eq!(
            fields(OutgoingMail::parse(&r, 1024)),
            ["text_body", "html_body"]
        );
        // Other controls stay allowed in bodies (a form feed in a text body is harmless).
        r.text_body = "Page\u{c}two".into();
        r.html_body = None;
        assert!(OutgoingMail::parse(&r, 1024).is_ok());
    }

    #[test]
    fn builds_alternative_and_hides_bcc() {
        let mut r = request("dana@fabrikam.example", "Quote");
        r.bcc = AddressInput::One("boss@contoso.example".into());
        r.html_body = Some("<p>Hello</p>".into());
        let mail = OutgoingMail::parse(&r, 1 << 20)
            .ok()
            .unwrap_or_else(|| panic!("valid"));
        let from: Mailbox = "Alice <alice@contoso.example>"
            .parse()
            .unwrap_or_else(|_| panic!("mailbox"));
        let message = mail
            .build(from, None, "abc@crm.example", std::time::SystemTime::now())
            .unwrap_or_else(|e| panic!("{e}"));
        let raw = String::from_utf8(message.formatted()).unwrap_or_default();
        assert!(raw.contains("Message-ID: <abc@crm.example>"));
        assert!(raw.contains("multipart/alternative"));
        assert!(
            !raw.contains("boss@contoso.example"),
            "Bcc is not in the headers"
        );
        assert_eq!(mail.recipients().count(), 2);
    }
}
