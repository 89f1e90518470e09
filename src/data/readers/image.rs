//! Grey image helpers: PNG decoding, area-averaging resize, quarter-turn rotation.

use crate::{Error, Result};

/// Decodes a PNG (any colour type and bit depth) into grey levels in [0, 1],
/// row-major, with its width and height. `name` is used in errors.
pub fn decode_png_grey(bytes: &[u8], name: &str) -> Result<(Vec<f32>, usize, usize)> {
    let bad = |e: String| Error::Format {
        path: name.into(),
        message: format!("not a readable PNG: {e}"),
    };
    let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().map_err(|e| bad(e.to_string()))?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| bad("image too large".into()))?;
    let mut buffer = vec![0; size];
    let info = reader
        .next_frame(&mut buffer)
        .map_err(|e| bad(e.to_string()))?;
    let (width, height) = (info.width as usize, info.height as usize);
    let channels = info.color_type.samples();
    let pixels = &buffer[..info.buffer_size()];
    let grey = (0..width * height)
        .map(|i| {
            let px = &pixels[i * channels..(i + 1) * channels];
            let level = match channels {
                1 | 2 => f32::from(px[0]),
                _ => (f32::from(px[0]) + f32::from(px[1]) + f32::from(px[2])) / 3.0,
            };
            level / 255.0
        })
        .collect();
    Ok((grey, width, height))
}

/// A PNG as a model of `size × size` grey images reads it: grey levels in [0, 1],
/// `inverted` (1 − level: dark strokes on white paper become 1 on 0, as Omniglot is
/// read), resized by area averaging. `name` is used in errors.
pub fn prepare_grey_png(bytes: &[u8], name: &str, size: usize, inverted: bool) -> Result<Vec<f32>> {
    let (grey, w, h) = decode_png_grey(bytes, name)?;
    let grey: Vec<f32> = if inverted {
        grey.iter().map(|v| 1.0 - v).collect()
    } else {
        grey
    };
    Ok(resize_area(&grey, w, h, size))
}

/// Resizes a row-major `width × height` image to `size × size` by area averaging:
/// every output pixel is the mean of the input area it covers (partial pixels
/// weighted by their overlap).
pub fn resize_area(image: &[f32], width: usize, height: usize, size: usize) -> Vec<f32> {
    if width == size && height == size {
        return image.to_vec();
    }
    let (sx, sy) = (width as f64 / size as f64, height as f64 / size as f64);
    // Overlap of output cell `o` (scale `s`) with input cell `i`.
    let weights = |o: usize, s: f64, n: usize| -> Vec<(usize, f64)> {
        let (a, b) = (o as f64 * s, (o + 1) as f64 * s);
        (a.floor() as usize..(b.ceil() as usize).min(n))
            .map(|i| (i, (b.min(i as f64 + 1.0) - a.max(i as f64)).max(0.0)))
            .filter(|&(_, w)| w > 0.0)
            .collect()
    };
    let columns: Vec<_> = (0..size).map(|x| weights(x, sx, width)).collect();
    let mut out = Vec::with_capacity(size * size);
    for y in 0..size {
        let rows = weights(y, sy, height);
        for cols in &columns {
            let mut sum = 0.0;
            let mut total = 0.0;
            for &(r, wr) in &rows {
                for &(c, wc) in cols {
                    sum += f64::from(image[r * width + c]) * wr * wc;
                    total += wr * wc;
                }
            }
            out.push((sum / total.max(1e-12)) as f32);
        }
    }
    out
}

/// A square `size × size` image rotated by `quarter_turns` × 90° clockwise.
pub fn rotate90(image: &[f32], size: usize, quarter_turns: usize) -> Vec<f32> {
    let mut current = image.to_vec();
    for _ in 0..quarter_turns % 4 {
        let mut next = vec![0.0; size * size];
        for y in 0..size {
            for x in 0..size {
                // Clockwise: (x, y) goes to (size - 1 - y, x).
                next[x * size + (size - 1 - y)] = current[y * size + x];
            }
        }
        current = next;
    }
    current
}
