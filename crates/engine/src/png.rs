use crate::{EngineError, GeneratedImage};

/// Encodes an RGB image as PNG with a `parameters` text chunk (tEXt when the text is
/// Latin-1, otherwise iTXt), the way the popular Stable Diffusion web UIs do.
pub fn encode_png(image: &GeneratedImage, parameters: &str) -> Result<Vec<u8>, EngineError> {
    let expected = image.width as usize * image.height as usize * 3;
    if image.rgb.len() != expected {
        return Err(EngineError::InvalidRequest(format!(
            "image buffer has {} bytes, {}x{} RGB needs {expected}",
            image.rgb.len(),
            image.width,
            image.height
        )));
    }
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, image.width, image.height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        if parameters.chars().all(|c| (c as u32) < 256) {
            encoder.add_text_chunk("parameters".into(), parameters.into())?;
        } else {
            encoder.add_itxt_chunk("parameters".into(), parameters.into())?;
        }
        let mut writer = encoder.write_header()?;
        writer.write_image_data(&image.rgb)?;
        writer.finish()?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_of(bytes: &[u8]) -> String {
        let reader = png::Decoder::new(std::io::Cursor::new(bytes))
            .read_info()
            .expect("png");
        let info = reader.info();
        info.uncompressed_latin1_text
            .iter()
            .map(|t| t.text.clone())
            .chain(info.utf8_text.iter().filter_map(|t| t.get_text().ok()))
            .next()
            .unwrap_or_default()
    }

    #[test]
    fn parameters_survive_in_latin1_and_unicode() {
        let image = GeneratedImage {
            width: 2,
            height: 1,
            rgb: vec![0, 10, 20, 30, 40, 50],
        };
        let latin = encode_png(&image, "a café\nSteps: 1").expect("encode");
        assert_eq!(text_of(&latin), "a café\nSteps: 1");
        let wide = encode_png(&image, "柴犬, style of monet").expect("encode");
        assert_eq!(text_of(&wide), "柴犬, style of monet");
        let bad = GeneratedImage {
            width: 3,
            height: 3,
            rgb: vec![0; 4],
        };
        assert!(encode_png(&bad, "x").is_err());
    }
}
