//! A mail as an author writes it, validated at the boundary: addresses parsed, no control
//! characters but tab in header fields and no NUL anywhere, at most 500 recipients, text and
//! files within their size limits; every problem in words, against its field.

use crm_sdk::FieldError;
use lettre::message::header::ContentType;
use lettre::message::{Mailbox, MultiPart, SinglePart};
use lettre::{Address, Message};
use serde::Deserialize;

use crate::outbox::attachments::{self, Attachment, AttachmentInput, Upload};

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
    /// The body as Markdown (the compose box): sent as its own plain text and as the HTML it
    /// renders to. Excludes `text_body` and `html_body`.
    #[serde(default)]
    pub markdown_body: Option<String>,
    /// Files, base64 in JSON.
    #[serde(default)]
    pub attachments: Vec<AttachmentInput>,
    /// Files uploaded by the compose form (multipart).
    #[serde(skip)]
    pub uploads: Vec<Upload>,
}

/// How large a mail may be, in bytes.
#[derive(Debug, Clone, Copy)]
pub struct SizeLimits {
    /// Subject and bodies together (`max_message_kb` × 1024).
    pub text: usize,
    /// All files together, before encoding (`max_attachments_mb` × 1,000,000).
    pub attachments: usize,
}

impl SizeLimits {
    /// Room for `text` bytes of text and no files (test mails).
    pub fn text_only(text: usize) -> Self {
        Self {
            text,
            attachments: 0,
        }
    }
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
    pub attachments: Vec<Attachment>,
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

const UNFIT_FOR_HEADER: &str = "This field must not contain line breaks or control characters";
const NUL_IN_BODY: &str = "The message must not contain NUL characters";

/// The items of an address list: split at commas outside quotes and angle brackets
/// (`"Adams, Alice" <a@x>, b@y` is two).
fn split_list(list: &str) -> Vec<&str> {
    let (mut items, mut start, mut quoted, mut angle) = (Vec::new(), 0, false, false);
    for (i, c) in list.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '<' if !quoted => angle = true,
            '>' if !quoted => angle = false,
            ',' | ';' if !quoted && !angle => {
                items.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&list[start..]);
    items
        .into_iter()
        .map(str::trim)
        .filter(|i| !i.is_empty())
        .collect()
}

/// `mailbox` as it can be delivered: a domain with letters outside ASCII written in its ASCII
/// form (IDNA, RFC 5891: `fäbrikam.example` becomes `xn--fbrikam-5wa.example`), which every
/// server takes, where the Unicode form needs SMTPUTF8 (RFC 6531) on the way. Refused, in
/// words, when the domain has no dot (no such domain takes mail on the Internet) or has no
/// ASCII form.
fn deliverable(mailbox: Mailbox) -> Result<Mailbox, &'static str> {
    let domain = mailbox.email.domain();
    let mailbox = if domain.is_ascii() {
        mailbox
    } else {
        match url::Host::parse(domain) {
            Ok(url::Host::Domain(ascii)) => Address::new(mailbox.email.user(), ascii)
                .map(|email| Mailbox::new(mailbox.name, email))
                .map_err(|_| "its domain cannot be written for mail")?,
            _ => return Err("its domain cannot be written for mail"),
        }
    };
    // After the conversion, which maps the other full stops (`。`) to `.`.
    if !mailbox.email.domain().contains('.') {
        return Err("its domain (after the @) has no dot");
    }
    Ok(mailbox)
}

/// The mailboxes of `field`; each bad one is named in its error.
fn parse_list(field: &str, input: &AddressInput, errors: &mut Vec<FieldError>) -> Vec<Mailbox> {
    let mut out = Vec::new();
    for item in input.items() {
        if unfit_for_header(item) {
            errors.push(err(field, UNFIT_FOR_HEADER));
            continue;
        }
        for one in split_list(item) {
            match one.parse::<Mailbox>().map(deliverable) {
                Ok(Ok(m)) => out.push(m),
                Ok(Err(why)) => errors.push(err(
                    field,
                    format!("Recipient \"{one}\" is not a complete e-mail address: {why}"),
                )),
                Err(_) => errors.push(err(
                    field,
                    format!("Recipient \"{one}\" is not an e-mail address (write name@example.com; separate several with commas)"),
                )),
            }
        }
    }
    out
}

/// The Reply-To mailbox, if one is given.
fn parse_reply_to(given: Option<&str>, errors: &mut Vec<FieldError>) -> Option<Mailbox> {
    let given = given.filter(|r| !r.trim().is_empty())?;
    if unfit_for_header(given) {
        errors.push(err("reply_to", UNFIT_FOR_HEADER));
        return None;
    }
    let given = given.trim();
    match given.parse::<Mailbox>().map(deliverable) {
        Ok(Ok(m)) => Some(m),
        Ok(Err(why)) => {
            errors.push(err(
                "reply_to",
                format!("Reply-To \"{given}\" is not a complete e-mail address: {why}"),
            ));
            None
        }
        Err(_) => {
            errors.push(err(
                "reply_to",
                format!("Reply-To \"{given}\" is not an e-mail address"),
            ));
            None
        }
    }
}

/// The plain text and the HTML to send, and the field the body came in: Markdown renders to
/// both; otherwise the text and the HTML as given.
fn bodies(
    request: &MailRequest,
    errors: &mut Vec<FieldError>,
) -> (String, Option<String>, &'static str) {
    let html_given = request.html_body.clone().filter(|h| !h.trim().is_empty());
    // A blank Markdown field beside a text or HTML body is no body at all (forms send it empty).
    let markdown = request.markdown_body.as_ref().filter(|m| {
        !m.trim().is_empty() || (request.text_body.trim().is_empty() && html_given.is_none())
    });
    if let Some(markdown) = markdown {
        if !request.text_body.trim().is_empty() || html_given.is_some() {
            errors.push(err(
                "markdown_body",
                "Give the body once: markdown_body, or text_body and html_body",
            ));
        }
        if markdown.contains('\0') {
            errors.push(err("markdown_body", NUL_IN_BODY));
        } else if markdown.trim().is_empty() {
            errors.push(err("markdown_body", "Write a message"));
        } else {
            return (
                markdown.clone(),
                Some(crate::outbox::markdown::to_html(markdown)),
                "markdown_body",
            );
        }
        return (String::new(), None, "markdown_body");
    }
    if request.text_body.contains('\0') {
        errors.push(err("text_body", NUL_IN_BODY));
    }
    if html_given.as_ref().is_some_and(|h| h.contains('\0')) {
        errors.push(err("html_body", NUL_IN_BODY));
    }
    if request.text_body.trim().is_empty() && html_given.is_none() {
        errors.push(err("text_body", "Write a message"));
    }
    (request.text_body.clone(), html_given, "text_body")
}

impl OutgoingMail {
    /// Validates a request; every problem is reported against its field, in words.
    pub fn parse(request: MailRequest, limits: SizeLimits) -> Result<Self, Vec<FieldError>> {
        let mut errors = Vec::new();
        let to = parse_list("to", &request.to, &mut errors);
        let cc = parse_list("cc", &request.cc, &mut errors);
        let bcc = parse_list("bcc", &request.bcc, &mut errors);
        let total = to.len() + cc.len() + bcc.len();
        if errors.is_empty() && total == 0 {
            errors.push(err("to", "Add at least one recipient"));
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
            errors.push(err("subject", "Write a subject"));
        } else if subject.chars().count() > 998 {
            errors.push(err(
                "subject",
                "The subject is too long (at most 998 characters)",
            ));
        }
        let reply_to = parse_reply_to(request.reply_to.as_deref(), &mut errors);
        let (text_body, html_body, body_field) = bodies(&request, &mut errors);
        let size = subject.len() + text_body.len() + html_body.as_ref().map_or(0, String::len);
        if size > limits.text {
            // In the setting's unit (`max_message_kb`, KB of 1,024 bytes), and saying why a
            // Markdown text counts about twice its length.
            let kb = |n: usize| format!("{} KB", n.div_ceil(1024));
            let twice = if html_body.is_some() {
                " (it goes both as plain text and as HTML)"
            } else {
                ""
            };
            errors.push(err(
                body_field,
                format!(
                    "The text is {} as sent{twice}; the limit is {} (files are counted apart)",
                    kb(size),
                    kb(limits.text)
                ),
            ));
        }
        let mut uploads = attachments::decode(&request.attachments, &mut errors);
        uploads.extend(request.uploads);
        let attachments = attachments::check(uploads, limits.attachments, &mut errors);
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            to,
            cc,
            bcc,
            subject,
            text_body,
            html_body,
            reply_to,
            attachments,
        })
    }

    /// About the size of its message text, in bytes: the bodies, and the files as base64
    /// (4 bytes for 3). For grouping mails by size before they are built.
    pub fn size_bytes(&self) -> usize {
        let files: usize = self.attachments.iter().map(|a| a.bytes.len()).sum();
        self.text_body.len() + self.html_body.as_ref().map_or(0, String::len) + files / 3 * 4
    }

    /// Every envelope recipient.
    pub fn recipients(&self) -> impl Iterator<Item = &Address> {
        self.to
            .iter()
            .chain(&self.cc)
            .chain(&self.bcc)
            .map(|m| &m.email)
    }

    /// Builds the message to send: From, optional Sender, a fixed Message-ID and Date; the
    /// text (and HTML as `multipart/alternative`), then the files (`multipart/mixed`).
    pub fn build(
        self,
        from: Mailbox,
        sender: Option<Mailbox>,
        message_id: &str,
        date: std::time::SystemTime,
    ) -> Result<Message, lettre::error::Error> {
        let mut builder = Message::builder()
            .from(from)
            .subject(self.subject)
            .message_id(Some(format!("<{message_id}>")))
            .date(date);
        if let Some(sender) = sender {
            builder = builder.sender(sender);
        }
        for m in self.to {
            builder = builder.to(m);
        }
        for m in self.cc {
            builder = builder.cc(m);
        }
        for m in self.bcc {
            builder = builder.bcc(m);
        }
        if let Some(r) = self.reply_to {
            builder = builder.reply_to(r);
        }
        let text = SinglePart::builder()
            .header(ContentType::TEXT_PLAIN)
            .body(self.text_body);
        let alternative = self.html_body.map(|html| {
            MultiPart::alternative()
                .singlepart(text.clone())
                .singlepart(
                    SinglePart::builder()
                        .header(ContentType::TEXT_HTML)
                        .body(html),
                )
        });
        if self.attachments.is_empty() {
            return match alternative {
                Some(alternative) => builder.multipart(alternative),
                None => builder.singlepart(text),
            };
        }
        let mut mixed = match alternative {
            Some(alternative) => MultiPart::mixed().multipart(alternative),
            None => MultiPart::mixed().singlepart(text),
        };
        for file in self.attachments {
            mixed = mixed.singlepart(file.into_part());
        }
        builder.multipart(mixed)
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
                request("Dana <dana@fabrikam.example>, evan@northwind.example", "Hi"),
                SizeLimits::text_only(1024)
            )
            .is_ok()
        );
        assert_eq!(
            fields(OutgoingMail::parse(
                request("a@b.example", "Hi\r\nBcc: victim@x.example"),
                SizeLimits::text_only(1024)
            )),
            ["subject"]
        );
        assert_eq!(
            fields(OutgoingMail::parse(
                request("a@b.example\r\nBcc: v@x.example", "Hi"),
                SizeLimits::text_only(1024)
            )),
            ["to"]
        );
        assert_eq!(
            fields(OutgoingMail::parse(
                request("not an address", "Hi"),
                SizeLimits::text_only(1024)
            )),
            ["to"]
        );
        let many: Vec<String> = (0..501).map(|i| format!("r{i}@x.example")).collect();
        let mut r = request("", "Hi");
        r.to = AddressInput::Many(many);
        assert_eq!(
            fields(OutgoingMail::parse(
                r.clone(),
                SizeLimits::text_only(1 << 20)
            )),
            ["to"]
        );
        let mut big = request("a@b.example", "Hi");
        big.text_body = "x".repeat(2048);
        let errors = OutgoingMail::parse(big, SizeLimits::text_only(10 * 1024))
            .err()
            .unwrap_or_default();
        assert_eq!(errors.len(), 0, "{errors:?}");
        let mut big = request("a@b.example", "Hi");
        big.text_body = "x".repeat(20 * 1024);
        let errors = OutgoingMail::parse(big, SizeLimits::text_only(10 * 1024))
            .err()
            .unwrap_or_default();
        assert_eq!(errors[0].field, "text_body");
        assert_eq!(
            errors[0].message,
            "The text is 21 KB as sent; the limit is 10 KB (files are counted apart)"
        );
        // Markdown goes as text and as HTML: 6 KB written is about 12 KB sent.
        let mut big = request("a@b.example", "Hi");
        big.text_body = String::new();
        big.markdown_body = Some("y".repeat(6 * 1024));
        let errors = OutgoingMail::parse(big, SizeLimits::text_only(10 * 1024))
            .err()
            .unwrap_or_default();
        assert_eq!(errors[0].field, "markdown_body");
        assert!(
            errors[0]
                .message
                .starts_with("The text is 13 KB as sent (it goes both as plain text and as HTML); the limit is 10 KB"),
            "{}",
            errors[0].message
        );
    }

    #[test]
    fn refuses_control_characters_in_every_header_field_and_nul_anywhere() {
        for bad in ["\u{b}", "\u{c}", "\0", "\u{1b}[31m", "\r", "\n", "\u{7f}"] {
            assert_eq!(
                fields(OutgoingMail::parse(
                    request("a@b.example", &format!("Hi{bad}there")),
                    SizeLimits::text_only(1024)
                )),
                ["subject"],
                "{bad:?}"
            );
            assert_eq!(
                fields(OutgoingMail::parse(
                    request(&format!("Dana{bad} <a@b.example>"), "Hi"),
                    SizeLimits::text_only(1024)
                )),
                ["to"],
                "{bad:?}"
            );
            let mut r = request("a@b.example", "Hi");
            r.cc = AddressInput::Many(vec![format!("c{bad}@b.example")]);
            r.reply_to = Some(format!("r@b.example{bad}"));
            assert_eq!(
                fields(OutgoingMail::parse(r.clone(), SizeLimits::text_only(1024))),
                ["cc", "reply_to"],
                "{bad:?}"
            );
        }
        assert!(
            OutgoingMail::parse(
                request("a@b.example", "Tab\there"),
                SizeLimits::text_only(1024)
            )
            .is_ok()
        );
        let mut r = request("a@b.example", "Hi");
        r.text_body = "Hello\0world".into();
        r.html_body = Some("<p>\0</p>".into());
        assert_eq!(
            fields(OutgoingMail::parse(r.clone(), SizeLimits::text_only(1024))),
            ["text_body", "html_body"]
        );
        // Other controls stay allowed in bodies (a form feed in a text body is harmless).
        r.text_body = "Page\u{c}two".into();
        r.html_body = None;
        assert!(OutgoingMail::parse(r.clone(), SizeLimits::text_only(1024)).is_ok());
    }

    #[test]
    fn builds_alternative_and_hides_bcc() {
        let mut r = request("dana@fabrikam.example", "Quote");
        r.bcc = AddressInput::One("boss@contoso.example".into());
        r.html_body = Some("<p>Hello</p>".into());
        let mail = OutgoingMail::parse(r.clone(), SizeLimits::text_only(1 << 20))
            .ok()
            .unwrap_or_else(|| panic!("valid"));
        let from: Mailbox = "Alice <alice@contoso.example>"
            .parse()
            .unwrap_or_else(|_| panic!("mailbox"));
        assert_eq!(mail.recipients().count(), 2);
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
    }

    #[test]
    fn a_unicode_domain_goes_in_its_ascii_form_and_a_dotless_one_is_refused() {
        let mut r = request("Dana <dana@fäbrikam.example>, evan@contoso.example", "Hi");
        r.reply_to = Some("desk@bücher.example".into());
        let mail = OutgoingMail::parse(r, SizeLimits::text_only(1024))
            .ok()
            .unwrap_or_else(|| panic!("valid"));
        let to: Vec<String> = mail.recipients().map(ToString::to_string).collect();
        assert_eq!(to, ["dana@xn--fbrikam-5wa.example", "evan@contoso.example"]);
        assert_eq!(mail.to[0].name.as_deref(), Some("Dana"));
        assert_eq!(
            mail.reply_to.map(|m| m.email.to_string()).as_deref(),
            Some("desk@xn--bcher-kva.example")
        );
        // Letters outside ASCII before the @ stay: only a server with SMTPUTF8 (or Graph) takes
        // them, which is known when the mail is sent.
        let mail = OutgoingMail::parse(
            request("dänä@fabrikam.example", "Hi"),
            SizeLimits::text_only(1024),
        )
        .ok()
        .unwrap_or_else(|| panic!("valid"));
        assert_eq!(
            mail.recipients().next().map(ToString::to_string).as_deref(),
            Some("dänä@fabrikam.example")
        );
        // A full stop of another script is a dot.
        let mail =
            OutgoingMail::parse(request("kenji@例え。jp", "Hi"), SizeLimits::text_only(1024))
                .unwrap_or_else(|e| panic!("valid: {e:?}"));
        assert_eq!(
            mail.recipients()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["kenji@xn--r8jz45g.jp"]
        );
        let mut r = request("dana@fabrikam", "Hi");
        r.cc = AddressInput::One("fiona@localhost".into());
        r.reply_to = Some("desk@intranet".into());
        let errors = fields(OutgoingMail::parse(r, SizeLimits::text_only(1024)));
        assert_eq!(errors, ["to", "cc", "reply_to"], "{errors:?}");
        let errors =
            OutgoingMail::parse(request("dana@fabrikam", "Hi"), SizeLimits::text_only(1024))
                .err()
                .unwrap_or_default();
        assert_eq!(
            errors[0].message,
            "Recipient \"dana@fabrikam\" is not a complete e-mail address: its domain (after the @) has no dot"
        );
    }

    #[test]
    fn names_the_bad_recipient_and_keeps_quoted_commas() {
        let r = request(
            "\"Adams, Alice\" <alice@contoso.example>; dana@fabrikam.example, bob@",
            "Hi",
        );
        let errors = OutgoingMail::parse(r, SizeLimits::text_only(1024))
            .err()
            .unwrap_or_default();
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0]
                .message
                .starts_with("Recipient \"bob@\" is not an e-mail address"),
            "{}",
            errors[0].message
        );
        let ok = OutgoingMail::parse(
            request(
                "\"Adams, Alice\" <alice@contoso.example>, dana@fabrikam.example",
                "Hi",
            ),
            SizeLimits::text_only(1024),
        )
        .ok()
        .unwrap_or_else(|| panic!("valid"));
        assert_eq!(ok.recipients().count(), 2);
    }

    #[test]
    fn markdown_becomes_text_and_html_and_files_ride_along_in_mixed() {
        let mut r = request("dana@fabrikam.example", "Quote");
        r.text_body = String::new();
        r.markdown_body = Some("**Total**: 1 EUR".into());
        r.uploads = vec![Upload {
            filename: "Angebot Müller.pdf".into(),
            content_type: None,
            bytes: vec![0, 159, 146, 150, 255],
        }];
        let limits = SizeLimits {
            text: 1024,
            attachments: 1024,
        };
        let mail = OutgoingMail::parse(r, limits)
            .ok()
            .unwrap_or_else(|| panic!("valid"));
        assert_eq!(
            mail.html_body
                .as_deref()
                .map(|h| h.contains("<strong>Total</strong>")),
            Some(true)
        );
        let from: Mailbox = "a@contoso.example"
            .parse()
            .unwrap_or_else(|_| panic!("mailbox"));
        let raw = mail
            .build(from, None, "m@crm.example", std::time::SystemTime::now())
            .unwrap_or_else(|e| panic!("{e}"))
            .formatted();
        let raw = String::from_utf8(raw).unwrap_or_default();
        assert!(raw.contains("multipart/mixed"), "{raw}");
        assert!(raw.contains("multipart/alternative"), "{raw}");
        assert!(raw.contains("filename*"), "RFC 2231 name\n{raw}");
        assert!(raw.contains("Content-Transfer-Encoding: base64"), "{raw}");
    }
}
