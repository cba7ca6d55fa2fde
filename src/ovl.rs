//! Overlay's on-disk encoding, in one place: how an upper directory (and a
//! lower directory laybak builds) records whiteouts, opaque directories and
//! overlay's own bookkeeping, how a user's own `trusted.overlay.*` xattrs
//! are escaped, and which of overlay's attributes laybak refuses (with the
//! reason it gives). Everything that reads or writes layer directories —
//! the scanner, restore into lowerdirs, merges and folds, `status` — takes
//! its decisions from here; what the layers mean together (a whiteout hides
//! below, an opaque directory replaces, a renamed directory continues where
//! it came from) is the pure rule of [`crate::stack`].
//!
//! Verified on Linux 6.18 with laybak's mount options (trusted xattrs,
//! `redirect_dir=on`, `index=off`, `metacopy=off`; see `OVERLAY.md` and
//! `overlay/RESEARCH.md` A.3).

use crate::layer::DirKind;
use rustix::fs::Stat;

/// Namespace of overlay's private xattrs (laybak mounts in trusted mode).
pub const PREFIX: &[u8] = b"trusted.overlay.";
/// A user's own `trusted.overlay.X` as overlay stores it in a layer:
/// `trusted.overlay.overlay.X`.
pub const ESCAPED: &[u8] = b"trusted.overlay.overlay.";
/// Marks a directory that hides everything below it.
pub const OPAQUE: &[u8] = b"trusted.overlay.opaque";
/// The value of [`OPAQUE`] the kernel writes.
pub const OPAQUE_YES: &[u8] = b"y";
/// Marks a renamed directory: the value names where its lower content is
/// (a sibling's name, or a `/`-led path from the root of the layers
/// below). Needs `redirect_dir=on` (made) or `follow` (read).
pub const REDIRECT: &[u8] = b"trusted.overlay.redirect";

/// How a directory of an upper stacks, from the markers found on it: the
/// kernel does not read an opaque directory's redirect.
pub fn dir_kind(opaque: bool, redirect: Option<Vec<u8>>) -> DirKind {
    match (opaque, redirect) {
        (true, _) => DirKind::Opaque,
        (false, Some(r)) => DirKind::Redirect(r),
        (false, None) => DirKind::Merge,
    }
}

/// The xattr that marks a directory of `kind` in a layer directory.
pub fn dir_xattr(kind: &DirKind) -> Option<(Vec<u8>, Vec<u8>)> {
    match kind {
        DirKind::Merge => None,
        DirKind::Opaque => Some((OPAQUE.to_vec(), OPAQUE_YES.to_vec())),
        DirKind::Redirect(r) => Some((REDIRECT.to_vec(), r.clone())),
    }
}

/// Whether a stat result is a whiteout (a character device 0/0): the name
/// is deleted in the layers below.
pub fn is_whiteout(st: &Stat) -> bool {
    rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::CharacterDevice
        && st.st_rdev == 0
}

/// Whether xattr `k` is overlay's own (not the user's, escaped or not).
pub fn is_bookkeeping(k: &[u8]) -> bool {
    k.starts_with(PREFIX) && !k.starts_with(ESCAPED)
}

/// Whether xattr `k` is the user's (plain, never overlay's namespace).
pub fn is_plain_user(k: &[u8]) -> bool {
    !k.starts_with(PREFIX)
}

/// Xattrs a merged layer keeps: the user's, the escaped user ones and the
/// opaque and redirect markers; overlay's other bookkeeping (origin,
/// impure) describes the old upper, not the new layer.
pub fn kept_in_merge(k: &[u8]) -> bool {
    !is_bookkeeping(k) || k == OPAQUE || k == REDIRECT
}

/// Whether a directory's xattrs mark it opaque.
pub fn is_opaque<'a>(xattrs: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> bool {
    xattrs
        .into_iter()
        .any(|(k, v)| k == OPAQUE && v == OPAQUE_YES)
}

/// What an overlay xattr in a sealed upper means.
#[derive(Debug, PartialEq, Eq)]
pub enum Attr {
    /// The directory is opaque.
    Opaque,
    /// The directory was renamed; its lower content is at this value.
    Redirect(Vec<u8>),
    /// Bookkeeping laybak drops (origin, impure, uuid, protattr).
    Bookkeeping,
    /// The user's own `trusted.overlay.X`, escaped: kept as user data.
    User,
    /// Something laybak will not store, and why (one line, with the path
    /// put in front by the caller).
    Refused(String),
}

/// Interpret overlay xattr `name` = `value` found in a sealed upper.
/// `name` must start with [`PREFIX`].
pub fn interpret(name: &[u8], value: &[u8]) -> Attr {
    let key = name.strip_prefix(PREFIX).unwrap_or(name);
    let refuse = |why: &str| Attr::Refused(why.to_string());
    match key {
        b"opaque" if value == OPAQUE_YES => Attr::Opaque,
        b"opaque" => Attr::Refused(format!(
            "has trusted.overlay.opaque={:?}, which the kernel never writes into an upperdir: this layer was made by another tool; laybak will not archive it",
            String::from_utf8_lossy(value)
        )),
        b"origin" | b"impure" | b"uuid" | b"protattr" => Attr::Bookkeeping,
        b"redirect" if crate::layer::redirect_is_valid(value) => Attr::Redirect(value.to_vec()),
        b"redirect" => Attr::Refused(format!(
            "has trusted.overlay.redirect={:?}, which is not a redirect the kernel follows: this layer was made by another tool; laybak will not archive it",
            String::from_utf8_lossy(value)
        )),
        b"metacopy" => refuse(
            "is a metadata-only copy-up (trusted.overlay.metacopy): the volume was mounted with metacopy=on; remount it with `laybak up` (metacopy=off)",
        ),
        b"nlink" => refuse(
            "has trusted.overlay.nlink: the volume was mounted with index=on; remount it with `laybak up` (index=off)",
        ),
        b"whiteout" => refuse(
            "is an xattr whiteout, which the kernel never writes into an upperdir: this layer was made by another tool",
        ),
        k if k.starts_with(b"overlay.") => Attr::User,
        _ => Attr::Refused(format!(
            "carries an unknown overlay attribute {}: this kernel writes something laybak does not understand; refusing to store a wrong layer",
            String::from_utf8_lossy(name)
        )),
    }
}

/// A stored xattr name as it must be written into a plain directory (a
/// restore): the user's escaped `trusted.overlay.overlay.X` becomes
/// `trusted.overlay.X` again. In a lowerdir the escaped form is kept.
pub fn unescape(k: &[u8]) -> Vec<u8> {
    match k.strip_prefix(ESCAPED) {
        Some(rest) => [PREFIX, rest].concat(),
        None => k.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_encoding() {
        assert_eq!(interpret(b"trusted.overlay.opaque", b"y"), Attr::Opaque);
        assert!(matches!(
            interpret(b"trusted.overlay.opaque", b"x"),
            Attr::Refused(_)
        ));
        assert_eq!(interpret(b"trusted.overlay.origin", b""), Attr::Bookkeeping);
        assert_eq!(interpret(b"trusted.overlay.overlay.mine", b"1"), Attr::User);
        assert_eq!(
            interpret(b"trusted.overlay.redirect", b"/a/b"),
            Attr::Redirect(b"/a/b".to_vec())
        );
        assert_eq!(
            interpret(b"trusted.overlay.redirect", b"a"),
            Attr::Redirect(b"a".to_vec())
        );
        for bad in [&b"a/b"[..], b"//a", b"/a/", b"/", b"", b"..", b"/a/../b"] {
            assert!(
                matches!(
                    interpret(b"trusted.overlay.redirect", bad),
                    Attr::Refused(_)
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            interpret(b"trusted.overlay.frob", b""),
            Attr::Refused(_)
        ));
        assert_eq!(
            unescape(b"trusted.overlay.overlay.mine"),
            b"trusted.overlay.mine"
        );
        assert_eq!(unescape(b"user.x"), b"user.x");
        assert!(is_bookkeeping(b"trusted.overlay.impure"));
        assert!(!is_bookkeeping(b"trusted.overlay.overlay.mine"));
        assert!(kept_in_merge(OPAQUE) && !kept_in_merge(b"trusted.overlay.origin"));
        assert!(is_opaque([(OPAQUE, OPAQUE_YES)]));
    }
}
