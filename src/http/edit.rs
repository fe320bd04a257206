//! Header edits (set, append, remove) made by filters, applied where a head
//! is written: the request sent upstream and the response sent to the client.
//! The head itself is never changed (the access log keeps what arrived).

/// How a header edit applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EditOp {
    /// Replace every field of that name with this one (add it if absent).
    Set,
    /// Add a field, keeping those already there.
    Append,
    /// Remove every field of that name.
    Remove,
}

/// One header edit, checked: a valid name (lower case) and value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderEdit {
    pub op: EditOp,
    pub name: String,
    pub value: String,
}

/// Whether an edit touches header `name` (the head's own fields of that
/// name are then written by [`write_edited`], not as they came).
pub fn touches(edits: &[HeaderEdit], name: &[u8]) -> bool {
    edits.iter().any(|e| e.name.as_bytes().eq_ignore_ascii_case(name))
}

/// Writes, as `name: value\r\n` lines, the fields of every header name the
/// edits touch, as the edits leave them: `values(name)` are the head's own.
/// Names for which `skip` holds are left out (written by someone else).
pub fn write_edited<'a>(
    edits: &[HeaderEdit],
    values: impl Fn(&str) -> Vec<&'a [u8]>,
    skip: impl Fn(&str) -> bool,
    out: &mut Vec<u8>,
) {
    each_edited(edits, values, |name, value| {
        if skip(name) {
            return;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    });
}

/// Calls `field(name, value)` for every field of the header names the edits
/// touch, as the edits leave them, each name once, in the order first edited.
pub fn each_edited<'a>(
    edits: &[HeaderEdit],
    values: impl Fn(&str) -> Vec<&'a [u8]>,
    mut field: impl FnMut(&str, &[u8]),
) {
    for name in edited_names(edits) {
        for value in apply(edits, name, values(name)) {
            field(name, value);
        }
    }
}

/// Each header name the edits touch, once, in the order first edited.
pub fn edited_names(edits: &[HeaderEdit]) -> impl Iterator<Item = &str> {
    edits
        .iter()
        .enumerate()
        .filter(|&(i, edit)| !edits[..i].iter().any(|earlier| earlier.name == edit.name))
        .map(|(_, edit)| edit.name.as_str())
}

/// The fields of header `name` once the edits are applied, in order, to
/// `current` (the head's own fields of that name): the one rule every
/// writer and reader of edited heads follows.
pub fn apply<'a>(edits: &'a [HeaderEdit], name: &str, mut current: Vec<&'a [u8]>) -> Vec<&'a [u8]> {
    for edit in edits.iter().filter(|e| e.name.eq_ignore_ascii_case(name)) {
        match edit.op {
            EditOp::Set => {
                current.clear();
                current.push(edit.value.as_bytes());
            }
            EditOp::Append => current.push(edit.value.as_bytes()),
            EditOp::Remove => current.clear(),
        }
    }
    current
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edit(op: EditOp, name: &str, value: &str) -> HeaderEdit {
        HeaderEdit {
            op,
            name: name.into(),
            value: value.into(),
        }
    }

    #[test]
    fn edits_apply_in_order_per_name() {
        let edits = [
            edit(EditOp::Append, "x-a", "2"),
            edit(EditOp::Set, "x-b", "new"),
            edit(EditOp::Remove, "x-c", ""),
            edit(EditOp::Append, "x-c", "again"),
        ];
        let mut out = Vec::new();
        let original = |name: &str| -> Vec<&'static [u8]> {
            match name {
                "x-a" => vec![b"1"],
                "x-b" => vec![b"old", b"older"],
                "x-c" => vec![b"gone"],
                _ => vec![],
            }
        };
        write_edited(&edits, original, |_| false, &mut out);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "x-a: 1\r\nx-a: 2\r\nx-b: new\r\nx-c: again\r\n"
        );
        assert!(touches(&edits, b"X-B") && !touches(&edits, b"x-d"));
    }
}
