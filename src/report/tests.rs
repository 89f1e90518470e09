use super::*;

const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];

fn check_pair(stem: &Path) {
    let png = std::fs::read(plots_path(stem, "png")).unwrap();
    assert!(png.len() > 1000, "png too small: {}", png.len());
    assert_eq!(png[..8], PNG_SIGNATURE);
    let svg = std::fs::read_to_string(plots_path(stem, "svg")).unwrap();
    assert!(svg.contains("<svg") && svg.len() > 500, "{svg}");
}

fn plots_path(stem: &Path, ext: &str) -> PathBuf {
    PathBuf::from(format!("{}.{ext}", stem.display()))
}

fn curves() -> Vec<(&'static str, Vec<(f64, f64)>)> {
    let curve = |scale: f64| -> Vec<(f64, f64)> {
        (0..50)
            .map(|s| (s as f64, scale * (-(s as f64) / 15.0).exp() + 0.3))
            .collect()
    };
    vec![
        ("MAML", curve(1.6)),
        ("FOMAML", curve(1.3)),
        ("MELoRA", curve(1.5)),
    ]
}

#[test]
fn every_plot_writes_png_and_svg() {
    let dir = tempfile::tempdir().unwrap();
    let stem = dir.path().join("curves");
    let (png, svg) = plots::training_curves(&stem, &curves(), "query loss").unwrap();
    assert_eq!(png, plots_path(&stem, "png"));
    assert_eq!(svg, plots_path(&stem, "svg"));
    check_pair(&stem);

    let stem = dir.path().join("pareto");
    plots::pareto(
        &stem,
        &[
            ("MAML", 900 << 20, 0.71, 0.02),
            ("FOMAML", 300 << 20, 0.66, 0.025),
            ("Reptile", 280 << 20, 0.64, 0.03),
            ("MELoRA", 350 << 20, 0.70, 0.02),
        ],
    )
    .unwrap();
    check_pair(&stem);

    let stem = dir.path().join("memory");
    let series = vec![
        (
            "MAML",
            (1..=5).map(|k| (k, ((k as u64) * 200) << 20)).collect(),
        ),
        (
            "MELoRA",
            (1..=5).map(|k| (k, 300u64 << 20)).collect::<Vec<_>>(),
        ),
    ];
    plots::memory_vs_k(&stem, &series).unwrap();
    check_pair(&stem);

    let stem = dir.path().join("ablation");
    let rows = vec!["rank 4".to_string(), "rank 8".into(), "rank 16".into()];
    let cols = vec!["k=1".to_string(), "k=3".into(), "k=5".into(), "k=10".into()];
    let values = vec![
        vec![0.61, 0.64, 0.66, 0.66],
        vec![0.63, 0.67, 0.69, f64::NAN],
        vec![0.64, 0.68, 0.71, 0.72],
    ];
    plots::heatmap(&stem, &rows, &cols, &values, "Accuracy by rank and k").unwrap();
    check_pair(&stem);
    let err = plots::heatmap(&stem, &rows, &cols, &values[..2], "x").unwrap_err();
    assert!(
        err.to_string().contains("2 rows of values for 3 row names"),
        "{err}"
    );

    // Text appears in the SVG when a font is available.
    if plots::font_available() {
        let svg = std::fs::read_to_string(plots_path(&stem, "svg")).unwrap();
        assert!(svg.contains("rank 16") && svg.contains("k=10"));
    }
    // No temporary files are left behind.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn report_renders_markdown_and_self_contained_html() {
    let dir = tempfile::tempdir().unwrap();
    plots::training_curves(dir.path().join("curves"), &curves(), "loss").unwrap();
    let table = Table {
        headers: vec!["method".into(), "accuracy".into(), "peak MiB".into()],
        rows: vec![
            vec!["MAML".into(), "0.710 ± 0.020".into(), "900".into()],
            vec!["MELoRA <lr|x>".into(), "0.700 ± 0.020".into(), "350".into()],
        ],
    };
    let report = Report::new("Sinusoid study").section(
        Section::new("Results")
            .paragraph("MELoRA matches MAML at a third of the memory.")
            .table(table)
            .heading("Curves")
            .image("curves.png", "Query loss per outer step"),
    );
    let (md_path, html_path) = report.write(dir.path()).unwrap();
    let md = std::fs::read_to_string(md_path).unwrap();
    assert!(md.starts_with("# Sinusoid study\n"), "{md}");
    assert!(md.contains("| method | accuracy | peak MiB |"), "{md}");
    assert!(md.contains("| --- | ---: | ---: |"), "{md}");
    assert!(md.contains("| MAML | 0.710 ± 0.020 | 900 |"), "{md}");
    assert!(
        md.contains("| MELoRA <lr\\|x> | 0.700 ± 0.020 | 350 |"),
        "{md}"
    );
    assert!(md.contains("### Curves"), "{md}");
    assert!(
        md.contains("![Query loss per outer step](curves.png)"),
        "{md}"
    );

    let html = std::fs::read_to_string(html_path).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(html.contains("<style>"));
    assert!(html.contains("<th>peak MiB</th>"), "{html}");
    assert!(html.contains("<td>MAML</td>"), "{html}");
    assert!(
        html.contains("<td class=\"num\">0.710 ± 0.020</td>"),
        "{html}"
    );
    assert!(html.contains("<td>MELoRA &lt;lr|x&gt;</td>"), "{html}");
    assert!(
        html.contains("data:image/png;base64,iVBORw0KGgo"),
        "png data URI"
    );
    // Self-contained: no reference to the image file itself.
    assert!(!html.contains("src=\"curves.png\""));

    let missing = Report::new("x").section(Section::new("s").image("nope.png", "gone"));
    let err = missing.write(dir.path()).unwrap_err().to_string();
    assert!(err.contains("nope.png"), "{err}");
}
