//! The console's own files, embedded in the binary: nothing is loaded from elsewhere (the
//! Content-Security-Policy allows only this origin), and the console uses the system's fonts,
//! so there is no font file to serve.

const CSS: &str = include_str!("assets/console.css");
const JS: &str = include_str!("assets/console.js");
const ICON: &str = include_str!("assets/favicon.svg");

/// A file by name: its media type and bytes.
pub fn get(name: &str) -> Option<(&'static str, &'static str)> {
    match name {
        "console.css" => Some(("text/css; charset=utf-8", CSS)),
        "console.js" => Some(("text/javascript; charset=utf-8", JS)),
        "favicon.svg" => Some(("image/svg+xml", ICON)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_assets_name_nothing_from_elsewhere() {
        for name in ["console.css", "console.js", "favicon.svg"] {
            let (_, body) = super::get(name).unwrap();
            // The icon's one URL is the SVG namespace, which names and loads nothing.
            let body = body.replace("xmlns=\"http://www.w3.org/2000/svg\"", "");
            assert!(
                !body.contains("https://") && !body.contains("http://"),
                "{name}"
            );
            assert!(
                !body.contains("@import") && !body.contains("url("),
                "{name}"
            );
            assert!(!body.contains("eval("), "{name}");
        }
        assert!(super::get("../mod.rs").is_none());
    }
}
