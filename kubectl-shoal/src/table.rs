//! Plain aligned tables in the style of `kubectl get`: a header row, columns
//! separated by three spaces, no borders, no trailing spaces.

/// Renders `header` and `rows` as left-aligned columns. Every row should have as
/// many cells as the header; missing cells are left empty.
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let columns = header.len();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate().take(columns) {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, width) in widths.iter().enumerate() {
            let cell = row.get(i).map(String::as_str).unwrap_or("");
            if i > 0 {
                line.push_str("   ");
            }
            line.push_str(cell);
            let pad = width.saturating_sub(cell.chars().count());
            line.extend(std::iter::repeat_n(' ', pad));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_columns_without_trailing_spaces() {
        let rows = vec![
            vec!["a".to_owned(), "longer".to_owned(), "x".to_owned()],
            vec!["bbbbbb".to_owned(), "c".to_owned(), String::new()],
        ];
        let text = render(&["NAME", "MODEL", "AGE"], &rows);
        assert_eq!(
            text,
            "NAME     MODEL    AGE\n\
             a        longer   x\n\
             bbbbbb   c\n"
        );
    }

    #[test]
    fn header_only_when_no_rows() {
        assert_eq!(render(&["NAME", "AGE"], &[]), "NAME   AGE\n");
    }
}
