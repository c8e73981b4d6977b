/// Like `assert_eq!`, but prints both sides on their own lines, which reads
/// better for multi-line output.
#[macro_export]
macro_rules! eqnice {
    ($expected:expr, $got:expr) => {{
        let (expected, got) = (&$expected, &$got);
        if expected != got {
            panic!("\n\nexpected:\n{expected:#?}\n\ngot:\n{got:#?}\n\n");
        }
    }};
}
