//! The daemon's module graph: `docs/design.md` ("Daemon module graph")
//! says which module of `crates/portkeepd/src` may use which, and this test
//! holds the code to that table, so the document and the code cannot
//! disagree.
//!
//! A use is a path `crate::NAME` (and, in `main.rs`, `portkeepd::NAME`)
//! in code, in `use` lines and inline, outside comments and string
//! literals. A path to an item of the crate root rather than to a module
//! (`crate::Daemon`) is a use of `lib`. `#[cfg(test)] mod` blocks are not
//! scanned: they are built only into the crate's own unit-test binary and
//! may drive their module through the layers above it.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const SECTION: &str = "## Daemon module graph";

/// One row of the table.
#[derive(Debug)]
struct Row {
    /// The file's name first, then any later name of the same module.
    names: Vec<String>,
    /// No file yet.
    planned: bool,
    /// `None`: may use anything.
    may_use: Option<BTreeSet<String>>,
}

/// The spans between backticks.
fn ticked(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(|s| s.trim().to_owned())
        .collect()
}

/// The first table after the section heading.
fn parse_table(doc: &str) -> Result<Vec<Row>, String> {
    let mut lines = doc.lines().skip_while(|l| l.trim() != SECTION);
    if lines.next().is_none() {
        return Err(format!("no `{SECTION}` section"));
    }
    let table: Vec<&str> = lines
        .take_while(|l| !l.starts_with("## "))
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .collect();
    let cells = |l: &str| -> Vec<String> {
        l.trim()
            .trim_start_matches('|')
            .trim_end_matches('|')
            .split('|')
            .map(|c| c.trim().to_owned())
            .collect()
    };
    match table.first().map(|l| cells(l)) {
        Some(h) if h == ["module", "role", "may use"] => {}
        other => {
            return Err(format!(
                "the table's header is {other:?}, not module | role | may use"
            ))
        }
    }
    let mut rows = Vec::new();
    for line in table.iter().skip(2) {
        let c = cells(line);
        let [module, role, may_use] = c.as_slice() else {
            return Err(format!("not three cells: {line}"));
        };
        let names = ticked(module);
        if names.is_empty() {
            return Err(format!("no module name: {line}"));
        }
        let uses = ticked(may_use);
        rows.push(Row {
            names,
            planned: role.contains("*planned*"),
            may_use: if uses.iter().any(|u| u == "*") {
                None
            } else {
                Some(uses.into_iter().collect())
            },
        });
    }
    if rows.is_empty() {
        return Err("the table has no rows".into());
    }
    Ok(rows)
}

/// `src` with comments, string and character literals blanked (newlines
/// kept), so that only code is searched.
fn code_only(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let blank = |out: &mut String, s: &[char]| {
        out.extend(s.iter().map(|&ch| if ch == '\n' { '\n' } else { ' ' }));
    };
    let ident = |ch: char| ch.is_alphanumeric() || ch == '_';
    let mut i = 0;
    while i < c.len() {
        let rest = &c[i..];
        let end = if rest.starts_with(&['/', '/']) {
            i + rest.iter().position(|&ch| ch == '\n').unwrap_or(rest.len())
        } else if rest.starts_with(&['/', '*']) {
            let (mut j, mut depth) = (i + 2, 1);
            while j < c.len() && depth > 0 {
                if c[j..].starts_with(&['/', '*']) {
                    depth += 1;
                    j += 2;
                } else if c[j..].starts_with(&['*', '/']) {
                    depth -= 1;
                    j += 2;
                } else {
                    j += 1;
                }
            }
            j
        } else if (c[i] == 'r' || (c[i] == 'b' && rest.get(1) == Some(&'r')))
            && (i == 0 || !ident(c[i - 1]))
            && {
                let k = i + if c[i] == 'b' { 2 } else { 1 };
                let hashes = c[k..].iter().take_while(|&&ch| ch == '#').count();
                c.get(k + hashes) == Some(&'"')
            }
        {
            // Raw string: r"..", r#".."#, br#".."#.
            let k = i + if c[i] == 'b' { 2 } else { 1 };
            let hashes = c[k..].iter().take_while(|&&ch| ch == '#').count();
            let mut j = k + hashes + 1;
            loop {
                if j >= c.len() {
                    break c.len();
                }
                if c[j] == '"'
                    && c[j + 1..]
                        .iter()
                        .take(hashes)
                        .filter(|&&h| h == '#')
                        .count()
                        == hashes
                {
                    break j + 1 + hashes;
                }
                j += 1;
            }
        } else if c[i] == '"' {
            let mut j = i + 1;
            while j < c.len() && c[j] != '"' {
                j += if c[j] == '\\' { 2 } else { 1 };
            }
            (j + 1).min(c.len())
        } else if c[i] == '\'' && rest.get(1) == Some(&'\\') {
            // Escaped character literal: '\n', '\'', '\u{..}'.
            let mut j = i + 3;
            while j < c.len() && c[j] != '\'' {
                j += 1;
            }
            (j + 1).min(c.len())
        } else if c[i] == '\'' && rest.get(2) == Some(&'\'') {
            i + 3
        } else {
            out.push(c[i]);
            i += 1;
            continue;
        };
        blank(&mut out, &c[i..end]);
        i = end;
    }
    out
}

/// `code` without its `#[cfg(test)] mod NAME { .. }` blocks.
fn without_test_modules(code: &str) -> String {
    let mut out = String::new();
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        let after = &rest[at + "#[cfg(test)]".len()..];
        let t = after.trim_start();
        let t = t.strip_prefix("pub(crate)").unwrap_or(t).trim_start();
        let is_mod = t
            .strip_prefix("mod")
            .is_some_and(|m| m.starts_with(char::is_whitespace));
        let open = t.find(['{', ';']);
        match (is_mod, open) {
            (true, Some(o)) if t[o..].starts_with('{') => {
                out.push_str(&rest[..at]);
                let body = &t[o..];
                let mut depth = 0usize;
                let mut end = body.len();
                for (k, ch) in body.char_indices() {
                    match ch {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = k + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                rest = &body[end..];
            }
            _ => {
                out.push_str(&rest[..at + "#[cfg(test)]".len()]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The first path segment of each item of a `{ .. }` group (`self` left
/// out), `text` starting just after the `{`.
fn group_heads(text: &str, heads: &mut BTreeSet<String>) {
    let mut depth = 0usize;
    let mut at_item = true;
    let mut word = String::new();
    for ch in text.chars() {
        if ch.is_alphanumeric() || ch == '_' {
            if depth == 0 && at_item {
                word.push(ch);
            }
            continue;
        }
        if !word.is_empty() {
            if word != "self" {
                heads.insert(std::mem::take(&mut word));
            }
            word.clear();
            at_item = false;
        }
        match ch {
            '{' => depth += 1,
            '}' if depth == 0 => return,
            '}' => depth -= 1,
            ',' if depth == 0 => at_item = true,
            _ => {}
        }
    }
}

/// The names used as `ROOT::NAME` (or `ROOT::{NAME, ..}`) in `code`.
fn uses_of(code: &str, root: &str, heads: &mut BTreeSet<String>) {
    let ident = |ch: char| ch.is_alphanumeric() || ch == '_';
    let mut from = 0;
    while let Some(k) = code[from..].find(root) {
        let at = from + k;
        from = at + root.len();
        if code[..at].chars().next_back().is_some_and(ident) {
            continue;
        }
        let Some(path) = code[from..].trim_start().strip_prefix("::") else {
            continue;
        };
        let path = path.trim_start();
        if let Some(group) = path.strip_prefix('{') {
            group_heads(group, heads);
        } else {
            let name: String = path.chars().take_while(|&ch| ident(ch)).collect();
            if !name.is_empty() {
                heads.insert(name);
            }
        }
    }
}

/// Every name `module`'s source uses from the library.
fn references(module: &str, src: &str) -> BTreeSet<String> {
    let code = without_test_modules(&code_only(src));
    let mut heads = BTreeSet::new();
    uses_of(&code, "crate", &mut heads);
    if module == "main" {
        uses_of(&code, "portkeepd", &mut heads);
    }
    heads
}

/// Everything wrong between the table and the sources (module name to
/// text), one line each.
fn check(rows: &[Row], sources: &BTreeMap<String, String>) -> Vec<String> {
    let mut problems = Vec::new();
    let mut row_of: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, r) in rows.iter().enumerate() {
        for n in &r.names {
            if row_of.insert(n, i).is_some() {
                problems.push(format!("`{n}` has more than one row"));
            }
        }
    }
    for r in rows {
        let file = &r.names[0];
        match (sources.contains_key(file), r.planned) {
            (false, false) => problems.push(format!(
                "row `{file}`: there is no src/{file}.rs (remove the row, or mark it *planned*)"
            )),
            (true, true) => problems.push(format!(
                "row `{file}`: src/{file}.rs exists, so it is no longer *planned*"
            )),
            _ => {}
        }
        for u in r.may_use.iter().flatten() {
            if !row_of.contains_key(u.as_str()) {
                problems.push(format!("row `{file}` may use `{u}`, which has no row"));
            }
        }
    }
    for (module, src) in sources {
        let Some(r) = rows.iter().find(|r| &r.names[0] == module) else {
            problems.push(format!(
                "src/{module}.rs has no row in the table (module | role | may use)"
            ));
            continue;
        };
        let Some(allowed) = &r.may_use else {
            continue;
        };
        for name in references(module, src) {
            let target = if sources.contains_key(&name) {
                name.clone()
            } else {
                "lib".to_owned()
            };
            if target == *module {
                continue;
            }
            let ok = match row_of.get(target.as_str()) {
                Some(&t) => rows[t].names.iter().any(|n| allowed.contains(n)),
                None => false,
            };
            if !ok {
                let via = if target == name {
                    String::new()
                } else {
                    format!(" (`crate::{name}`)")
                };
                problems.push(format!(
                    "`{module}` uses `{target}`{via}, which its row does not allow"
                ));
            }
        }
    }
    problems
}

#[test]
fn daemon_modules_follow_the_documented_graph() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(crate_dir.join("../../docs/design.md")).unwrap();
    let rows = parse_table(&doc).unwrap_or_else(|e| panic!("docs/design.md: {e}"));
    let mut sources = BTreeMap::new();
    for entry in std::fs::read_dir(crate_dir.join("src")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "rs") {
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            sources.insert(name, std::fs::read_to_string(&path).unwrap());
        }
    }
    assert!(sources.contains_key("lib"), "{sources:?}");
    let problems = check(&rows, &sources);
    assert!(
        problems.is_empty(),
        "crates/portkeepd/src disagrees with docs/design.md ({SECTION}):\n  {}",
        problems.join("\n  ")
    );
}

const MADE_UP: &str = "
# Notes

## Daemon module graph

| module | role | may use |
|---|---|---|
| `top` | at the top | `mid`, `low` |
| `mid`, `middle` | in the middle | `low` |
| `low` | a leaf | nothing |
| `future` | *planned* | `low` |

## Next section

| module | role | may use |
|---|---|---|
| `ignored` | not this table | |
";

fn made_up(files: &[(&str, &str)]) -> BTreeMap<String, String> {
    files
        .iter()
        .map(|(n, s)| ((*n).to_owned(), (*s).to_owned()))
        .collect()
}

#[test]
fn checker_reports_a_back_edge_and_nothing_else() {
    let rows = parse_table(MADE_UP).unwrap();
    assert_eq!(rows.len(), 4);
    let sources = made_up(&[
        (
            "top",
            "use crate::mid::Thing;\nfn f() { crate::low::g() }\n",
        ),
        ("mid", "use crate::{low, top::Back};\n"),
        (
            "low",
            "// crate::top::in_a_comment\nconst S: &str = \"crate::top\";\n",
        ),
    ]);
    assert_eq!(
        check(&rows, &sources),
        ["`mid` uses `top`, which its row does not allow"]
    );
}

#[test]
fn checker_reports_rows_and_files_that_do_not_match() {
    let rows = parse_table(MADE_UP).unwrap();
    let sources = made_up(&[("top", ""), ("low", ""), ("stray", ""), ("future", "")]);
    let problems = check(&rows, &sources);
    assert_eq!(
        problems,
        [
            "row `mid`: there is no src/mid.rs (remove the row, or mark it *planned*)",
            "row `future`: src/future.rs exists, so it is no longer *planned*",
            "src/stray.rs has no row in the table (module | role | may use)",
        ]
    );
}

#[test]
fn a_later_name_in_a_row_stands_for_the_module() {
    let doc = MADE_UP.replace(
        "| `top` | at the top | `mid`, `low` |",
        "| `top` | at the top | `middle` |",
    );
    let rows = parse_table(&doc).unwrap();
    let sources = made_up(&[("top", "use crate::mid;"), ("mid", ""), ("low", "")]);
    assert!(check(&rows, &sources).is_empty());
}

#[test]
fn scanner_finds_groups_and_inline_paths_but_not_comments_strings_or_test_modules() {
    let src = r##"
//! Uses `crate::doc_comment`.
use crate::a::{self, X};
use crate::{b, c::{D, E}, self as me};
pub(crate) fn f() -> crate::d::T { crate :: e::g(); }
/* crate::block /* nested crate::inner */ */
const R: &str = r#"crate::raw "quoted" crate::raw2"#;
const Q: char = '"';
fn h<'a>(x: &'a str) -> &'a str { let _ = crate::f::G; x }
#[cfg(test)]
mod tests {
    use crate::test_only;
    fn inner() { let _ = { crate::nested_test_only }; }
}
fn after() { crate::g::H }
"##;
    let refs: Vec<String> = references("m", src).into_iter().collect();
    assert_eq!(refs, ["a", "b", "c", "d", "e", "f", "g"]);
    assert_eq!(
        references("main", "use portkeepd::config::X; use portkeepd::Daemon;"),
        BTreeSet::from(["Daemon".to_owned(), "config".to_owned()])
    );
}
