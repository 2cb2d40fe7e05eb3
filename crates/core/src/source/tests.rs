use super::*;

fn limits() -> Limits {
    Limits::default()
}

fn encode(image: DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut bytes = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut bytes), format)
        .expect("encode");
    bytes
}

fn png(image: DynamicImage) -> Vec<u8> {
    encode(image, ImageFormat::Png)
}

/// Three vertical bands, red, green and blue, of `band` pixels each.
fn bands(band: u32, height: u32) -> DynamicImage {
    DynamicImage::ImageRgb8(RgbImage::from_fn(band * 3, height, |x, _| {
        let mut p = [0u8; 3];
        p[(x / band) as usize] = 255;
        image::Rgb(p)
    }))
}

/// A PNG whose header declares `width × height` over a one-pixel image's data, with the
/// header's checksum made right: what a decompression bomb looks like to a reader.
fn lying_png(width: u32, height: u32) -> Vec<u8> {
    let mut bytes = png(DynamicImage::ImageRgb8(RgbImage::new(1, 1)));
    // Signature (8), length (4), "IHDR" (4), then width and height.
    bytes[16..20].copy_from_slice(&width.to_be_bytes());
    bytes[20..24].copy_from_slice(&height.to_be_bytes());
    let crc = crc32(&bytes[12..29]);
    bytes[29..33].copy_from_slice(&crc.to_be_bytes());
    bytes
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn refused(image: &[u8], mask: Option<&[u8]>) -> RequestError {
    let err = Source::decode(image, mask, &limits()).expect_err("refused");
    assert_eq!(err.code, ErrorCode::InvalidImage, "{err}");
    err
}

#[test]
fn anything_but_a_bounded_png_jpeg_or_webp_is_refused_with_the_reason() {
    let fine = png(bands(4, 4));
    assert!(refused(b"", None).message.contains("empty"));
    assert!(refused(b"hello, not an image", None)
        .message
        .contains("PNG, JPEG or WebP"));
    let err = refused(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;", None);
    assert!(err.message.contains("image/gif"), "{err}");

    let big = vec![0u8; limits().max_source_bytes + 1];
    let err = refused(&big, None);
    assert!(err.message.contains("at most 10485760"), "{err}");

    // Declared far past the side limit: refused from the header, before any decoding.
    let err = refused(&lying_png(30_000, 30_000), None);
    assert!(err.message.contains("30000x30000"), "{err}");
    assert_eq!(err.param, Some("image"));
    // Declared within the limits but the data is not there: a decoding error, not a panic.
    let err = refused(&lying_png(4000, 4000), None);
    assert!(err.message.contains("cannot be read"), "{err}");

    let truncated = &fine[..fine.len() / 2];
    assert!(refused(truncated, None).message.contains("cannot be read"));

    let small_mask = png(DynamicImage::ImageLuma8(GrayImage::new(6, 4)));
    let err = refused(&fine, Some(&small_mask));
    assert_eq!(err.param, Some("mask"));
    assert!(
        err.message.contains("6x4") && err.message.contains("12x4"),
        "{err}"
    );

    for format in [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::WebP] {
        let source = Source::decode(&encode(bands(4, 4), format), None, &limits())
            .unwrap_or_else(|e| panic!("{format:?}: {e}"));
        assert_eq!(
            source.facts(&Outpaint::default()),
            SourceFacts {
                width: 12,
                height: 4,
                masked: false
            }
        );
    }
}

#[test]
fn an_image_is_scaled_to_cover_the_canvas_and_its_centre_kept() {
    // 3:1 bands brought to a square: the middle band is all that remains.
    let source = Source::decode(&png(bands(100, 100)), None, &limits()).expect("decode");
    let stored = source.fit(64, 64, &Outpaint::default());
    let pixels = SourcePixels::from_png(&stored, 64, 64, false).expect("read back");
    assert!(pixels.mask.is_none());
    assert_eq!(pixels.rgb.len(), 64 * 64 * 3);
    for rgb in pixels.rgb.chunks(3) {
        assert!(rgb[1] > 200 && rgb[0] < 40 && rgb[2] < 40, "{rgb:?}");
    }
    // Read back as a source again (a re-roll), it fits to itself unchanged.
    let again = Source::from_stored(&stored).expect("stored");
    assert_eq!(again.fit(64, 64, &Outpaint::default()), stored);
    // The stored PNG must be the job's size and kind.
    assert!(SourcePixels::from_png(&stored, 64, 56, false).is_err());
    assert!(SourcePixels::from_png(&stored, 64, 64, true).is_err());
}

#[test]
fn a_mask_follows_its_image_and_outpainting_repaints_the_margins() {
    // A 40×40 image, its left half masked white.
    let image = DynamicImage::ImageRgb8(RgbImage::from_pixel(40, 40, image::Rgb([10, 20, 30])));
    let mask = DynamicImage::ImageLuma8(GrayImage::from_fn(40, 40, |x, _| {
        image::Luma([if x < 20 { 255 } else { 0 }])
    }));
    let source = Source::decode(&png(image), Some(&png(mask)), &limits()).expect("decode");
    assert!(source.facts(&Outpaint::default()).masked);
    let stored = source.fit(40, 40, &Outpaint::default());
    let pixels = SourcePixels::from_png(&stored, 40, 40, true).expect("read back");
    let mask = pixels.mask.expect("masked");
    for y in 0..40 {
        for x in 0..40 {
            assert_eq!(mask[y * 40 + x], if x < 20 { 255 } else { 0 }, "({x}, {y})");
        }
    }

    // The same on a canvas 16 wider on the right and 8 taller above: the margins are
    // repainted and start from the image's edge.
    let outpaint = Outpaint {
        right: 16,
        up: 8,
        ..Outpaint::default()
    };
    let stored = source.fit(56, 48, &outpaint);
    let pixels = SourcePixels::from_png(&stored, 56, 48, true).expect("read back");
    let mask = pixels.mask.expect("masked");
    for y in 0..48usize {
        for x in 0..56usize {
            let inside = x < 40 && y >= 8;
            let expected = if !inside || x < 20 { 255 } else { 0 };
            assert_eq!(mask[y * 56 + x], expected, "({x}, {y})");
            let i = (y * 56 + x) * 3;
            assert_eq!(&pixels.rgb[i..i + 3], &[10, 20, 30], "({x}, {y})");
        }
    }

    // Outpainting alone masks the margins only.
    let plain = Source::decode(&png(bands(8, 8)), None, &limits()).expect("decode");
    assert!(plain.facts(&outpaint).masked);
    let stored = plain.fit(40, 16, &outpaint);
    let mask = SourcePixels::from_png(&stored, 40, 16, true)
        .expect("read back")
        .mask
        .expect("masked");
    assert_eq!(mask.iter().filter(|&&m| m == 0).count(), 24 * 8);
}

#[test]
fn transparent_areas_are_edited_as_openai_reads_them() {
    let rgba = RgbaImage::from_fn(16, 8, |x, _| {
        image::Rgba([200, 100, 50, if x < 4 { 0 } else { 255 }])
    });
    let source = Source::decode_transparent(&png(DynamicImage::ImageRgba8(rgba)), None, &limits())
        .expect("decode");
    let stored = source.fit(16, 8, &Outpaint::default());
    let mask = SourcePixels::from_png(&stored, 16, 8, true)
        .expect("read back")
        .mask
        .expect("masked");
    assert_eq!(mask.iter().filter(|&&m| m == 255).count(), 4 * 8);

    // An opaque image with a separate mask whose transparent part is edited.
    let opaque = png(bands(4, 8));
    let mask = png(DynamicImage::ImageRgba8(RgbaImage::from_fn(
        12,
        8,
        |_, y| image::Rgba([0, 0, 0, if y < 2 { 0 } else { 255 }]),
    )));
    let source = Source::decode_transparent(&opaque, Some(&mask), &limits()).expect("decode");
    assert!(source.facts(&Outpaint::default()).masked);
    // Nothing transparent: image-to-image.
    let source = Source::decode_transparent(&opaque, None, &limits()).expect("decode");
    assert!(!source.facts(&Outpaint::default()).masked);
    // A mask without alpha says nothing under this convention.
    let grey = png(DynamicImage::ImageLuma8(GrayImage::new(12, 8)));
    let err = Source::decode_transparent(&opaque, Some(&grey), &limits()).expect_err("no alpha");
    assert_eq!(err.param, Some("mask"));
}

#[test]
fn without_a_size_the_canvas_follows_the_source() {
    let facts = SourceFacts {
        width: 1000,
        height: 500,
        masked: false,
    };
    let (w, h) = natural_size(&facts, &Outpaint::default(), 512 * 512, 64, 2048);
    assert_eq!((w % 8, h % 8), (0, 0));
    assert!((f64::from(w) / f64::from(h) - 2.0).abs() < 0.05, "{w}x{h}");
    assert!((u64::from(w) * u64::from(h)).abs_diff(512 * 512) < 512 * 40);
    let outpaint = Outpaint {
        left: 64,
        right: 64,
        ..Outpaint::default()
    };
    let (wide, high) = natural_size(&facts, &outpaint, 512 * 512, 64, 2048);
    assert_eq!((wide, high), (w + 128, h));
    // Clamped to the limits.
    let thin = SourceFacts {
        width: 4000,
        height: 10,
        masked: false,
    };
    assert_eq!(
        natural_size(&thin, &Outpaint::default(), 512 * 512, 64, 2048),
        (2048, 64)
    );
}

#[test]
fn digests_tell_different_uploads_apart() {
    let a = png(bands(4, 4));
    let b = png(bands(4, 8));
    let one = Source::decode(&a, None, &limits()).expect("a").digest();
    assert_eq!(
        one,
        Source::decode(&a, None, &limits()).expect("a").digest()
    );
    assert_ne!(
        one,
        Source::decode(&b, None, &limits()).expect("b").digest()
    );
    let masked = Source::decode(&a, Some(&a), &limits())
        .expect("masked")
        .digest();
    assert_ne!(one, masked);
    assert!(!format!("{:?}", Source::decode(&a, None, &limits()).expect("a")).contains("255"));
}

#[test]
fn a_thin_strip_is_cut_before_it_is_scaled() {
    // 1×4096 brought to 1024×1024: a one-pixel box of the strip's middle, scaled, in a
    // moment and a few megabytes, not a 1024×4194304 stretch.
    let strip = DynamicImage::ImageRgb8(RgbImage::from_fn(1, 4096, |_, y| {
        image::Rgb([(y / 16) as u8, 7, 9])
    }));
    let source = Source::decode(&png(strip), None, &limits()).expect("decode");
    let started = std::time::Instant::now();
    let stored = source.fit(1024, 1024, &Outpaint::default());
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    let pixels = SourcePixels::from_png(&stored, 1024, 1024, false).expect("read back");
    assert!(
        pixels.rgb.chunks(3).all(|p| p == [127, 7, 9]),
        "the middle row (2047)"
    );
}
