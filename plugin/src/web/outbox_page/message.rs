//! A stored message as its page shows it: the plain text, the HTML part cleaned of scripts,
//! event handlers and `javascript:` URLs (never shown raw), and the attached files by name.

use mail_parser::{MessageParser, MimeHeaders, PartType};
use maud::{Markup, PreEscaped, html};
use serde::Serialize;

use crate::outbox::attachments::size_words;

/// One attached file as listed.
#[derive(Debug, Clone, Serialize)]
pub struct FileView {
    /// The decoded filename (RFC 2231 / RFC 2047).
    pub filename: String,
    /// Its MIME type, as sent.
    pub content_type: String,
    /// Its size after decoding, in bytes.
    pub size_bytes: usize,
}

/// What a reader sees of a message.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MessageView {
    /// The `text/plain` body, decoded.
    pub text_body: Option<String>,
    /// The `text/html` body, decoded and sanitised.
    pub html_body: Option<String>,
    /// The attached files.
    pub attachments: Vec<FileView>,
}

impl MessageView {
    /// Parses a stored RFC 5322 message; `None` when it does not parse.
    pub fn of(raw: &str) -> Option<Self> {
        let message = MessageParser::default().parse(raw.as_bytes())?;
        let text_body = message.text_part(0).and_then(|p| match &p.body {
            PartType::Text(t) => Some(t.to_string()),
            _ => None,
        });
        let html_body = message.html_part(0).and_then(|p| match &p.body {
            PartType::Html(h) => Some(crate::outbox::markdown::for_display(h)),
            _ => None,
        });
        let attachments = message
            .attachments()
            .map(|part| FileView {
                filename: part.attachment_name().unwrap_or("(no name)").to_string(),
                content_type: part
                    .content_type()
                    .map(|t| match t.subtype() {
                        Some(sub) => format!("{}/{sub}", t.ctype()),
                        None => t.ctype().to_string(),
                    })
                    .unwrap_or_else(|| "application/octet-stream".into()),
                size_bytes: part.contents().len(),
            })
            .collect();
        Some(Self {
            text_body,
            html_body,
            attachments,
        })
    }

    /// The message card: the formatted text when there is HTML (sanitised), else the plain text;
    /// then the files.
    pub fn render(&self) -> Markup {
        html! {
            @if let Some(html) = &self.html_body {
                div.message-html { (PreEscaped(html)) }
                @if let Some(text) = &self.text_body {
                    details { summary { "Plain-text version" } pre.message-text { (text) } }
                }
            } @else if let Some(text) = &self.text_body {
                pre.message-text { (text) }
            }
            @if !self.attachments.is_empty() {
                h3 { "Files" }
                ul.files {
                    @for f in &self.attachments {
                        li { (f.filename) " — " (f.content_type) ", " (size_words(f.size_bytes)) }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shows_html_without_scripts_handlers_or_javascript_urls() {
        let raw = "From: a@b.example\r\nTo: c@d.example\r\nSubject: x\r\nMIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nHello\r\n--b\r\nContent-Type: text/html\r\n\r\n<p onclick=\"steal()\">Hi <a href=\"javascript:alert(1)\">x</a><script>alert(2)</script><img src=x onerror=alert(3)></p>\r\n--b--\r\n";
        let view = MessageView::of(raw).expect("parses");
        let shown = view.render().into_string();
        assert!(shown.contains("Hi"), "{shown}");
        for bad in ["<script", "onclick", "onerror", "javascript:"] {
            assert!(!shown.contains(bad), "{bad} in {shown}");
        }
        assert_eq!(view.text_body.as_deref(), Some("Hello"));
    }
}
