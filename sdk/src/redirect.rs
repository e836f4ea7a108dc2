//! Redirect targets that come from a request (`?next=`, a form's `next`): parsed as URLs, kept
//! only when they stay on this site.

/// A stand-in origin to resolve targets against; only its sameness matters.
const PROBE_ORIGIN: &str = "https://same-origin.invalid/";

/// The same-origin path (with its query, percent-encoded) that `raw` leads to, or `None` when
/// a browser would leave the site with it (`//evil.example`, `/\evil.example`, `/\t/evil.example`,
/// `https://evil.example`, ...).
pub fn same_origin_path(raw: &str) -> Option<String> {
    // Only absolute paths: no schemes, no relative paths, nothing a browser would trim first.
    if !raw.starts_with('/') || raw.chars().any(|c| c.is_control() || c == '\\') {
        return None;
    }
    let base = url::Url::parse(PROBE_ORIGIN).ok()?;
    let resolved = base.join(raw).ok()?;
    if resolved.origin() != base.origin() {
        return None;
    }
    let mut target = resolved.path().to_string();
    if let Some(query) = resolved.query() {
        target.push('?');
        target.push_str(query);
    }
    // The serialised path must read back the same way: `/.//evil.example` resolves to the path
    // `//evil.example`, which a browser reads as another host.
    let reread = base.join(&target).ok()?;
    (target.starts_with('/') && !target.starts_with("//") && reread == resolved).then_some(target)
}

/// [`same_origin_path`], or `/` (the home page) for anything else.
pub fn redirect_target(raw: Option<&str>) -> String {
    raw.and_then(same_origin_path)
        .unwrap_or_else(|| "/".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_paths_and_refuses_other_sites() {
        assert_eq!(same_origin_path("/contacts").as_deref(), Some("/contacts"));
        assert_eq!(
            same_origin_path("/settings?tab=a%20b").as_deref(),
            Some("/settings?tab=a%20b")
        );
        for bad in [
            "/\t/evil.example",
            "/\n/evil.example",
            "//evil.example",
            "/\\evil.example",
            "\\/evil.example",
            "https://evil.example/",
            "javascript:alert(1)",
            "evil.example",
            "/.//evil.example",
            "/%2e//evil.example",
            "",
        ] {
            assert_eq!(same_origin_path(bad), None, "{bad:?}");
        }
        assert_eq!(redirect_target(Some("//evil.example")), "/");
        assert_eq!(redirect_target(None), "/");
    }
}
