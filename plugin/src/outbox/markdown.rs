//! Formatted text: the compose box's Markdown rendered to HTML (CommonMark with tables,
//! strikethrough and task lists, by `pulldown-cmark`), and any HTML the CRM shows cleaned of
//! scripts, event handlers and `javascript:` URLs (by `ammonia`).

use pulldown_cmark::{Options, Parser, html};

/// The HTML document of a Markdown text, ready for the `text/html` part. Raw HTML inside the
/// Markdown is cleaned, so what a user types cannot carry a script to the recipient.
pub fn to_html(markdown: &str) -> String {
    let mut options = Options::empty();
    options.insert(Options::ENABLE_TABLES);
    options.insert(Options::ENABLE_STRIKETHROUGH);
    options.insert(Options::ENABLE_TASKLISTS);
    let mut rendered = String::with_capacity(markdown.len() * 3 / 2);
    html::push_html(&mut rendered, Parser::new_ext(markdown, options));
    format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"></head><body>\n{}</body></html>\n",
        sanitize(&rendered)
    )
}

/// `html` without what could run in a reader's mail client or the CRM: `<script>`, `<style>`,
/// event handler attributes, `javascript:` and other non-web URLs, frames and forms
/// (`ammonia`'s defaults; links get `rel="noopener noreferrer"`), and relative URLs.
pub fn sanitize(html: &str) -> String {
    ammonia::Builder::default()
        .url_relative(ammonia::UrlRelative::Deny)
        .clean(html)
        .to_string()
}

/// `html` as the CRM shows it: [`sanitize`]d, and without images (a remote image would tell
/// its sender who read the mail, and a same-site one would send a request with the reader's
/// session).
pub fn for_display(html: &str) -> String {
    ammonia::Builder::default()
        .url_relative(ammonia::UrlRelative::Deny)
        .rm_tags(&["img"])
        .clean(html)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_markdown_and_cleans_raw_html() {
        let html = to_html(
            "# Quote\n\n**Total:** 1,200 EUR\n\n- one\n- two\n\n<script>alert(1)</script><a href=\"javascript:alert(1)\" onclick=\"x()\">x</a>",
        );
        assert!(html.contains("<h1>Quote</h1>"), "{html}");
        assert!(html.contains("<strong>Total:</strong>"), "{html}");
        assert!(html.contains("<li>two</li>"), "{html}");
        assert!(!html.contains("<script"), "{html}");
        assert!(!html.contains("javascript:"), "{html}");
        assert!(!html.contains("onclick"), "{html}");
    }
}
