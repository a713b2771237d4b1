/* Region-of-interest JPEG decoding with libjpeg(-turbo): only the pixels of one crop are made.
 *
 * A training crop covers part of the image. libjpeg-turbo's jpeg_skip_scanlines() passes over the rows above the
 * crop without the IDCT and colour conversion (their entropy-coded data must still be read: a baseline JPEG is
 * one Huffman stream), jpeg_crop_scanline() limits IDCT, upsampling and colour conversion to the iMCU columns
 * that hold the crop, and decoding stops after the crop's last row, so the rest of the stream is never
 * entropy-decoded at all. The crop's pixels are those of a full decode (tests/test_data_transforms.py).
 *
 * decode_region(data, factor, top, left, height, width, fast_upsample) -> bytearray of height x width x 3 RGB,
 * the box given in pixels of the image decoded at 1/factor scale (factor 1, 2, 4 or 8). Anything libjpeg
 * refuses or warns about (damaged data, CMYK, arithmetic coding where unsupported, extra bytes) raises
 * ValueError with libjpeg's message: the caller then decodes with Pillow, which decides.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>

#if !defined(LIBJPEG_TURBO_VERSION_NUMBER) || LIBJPEG_TURBO_VERSION_NUMBER < 2001000
/* jpeg_crop_scanline and jpeg_skip_scanlines are libjpeg-turbo API (1.5+), and 2.0.x still had bugs in them with
 * merged upsampling (CVE-2020-35538). Older headers fail the build, which setup.py allows: whole-image decoding. */
#error "libjpeg-turbo >= 2.1 headers are needed"
#endif

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf escape;
    char message[JMSG_LENGTH_MAX];
} ErrorManager;

static void on_error(j_common_ptr cinfo) {
    ErrorManager *err = (ErrorManager *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->escape, 1);
}

static void on_message(j_common_ptr cinfo, int level) {
    /* level -1: a warning (corrupt data that libjpeg works around). Keep the first one; the decode fails at
     * the end, as simplejpeg's strict mode does, so that such files take the same (Pillow) path as before. */
    ErrorManager *err = (ErrorManager *)cinfo->err;
    if (level < 0 && err->pub.num_warnings++ == 0)
        (*cinfo->err->format_message)(cinfo, err->message);
}

/* 0 on success; else err->message says why. `out` holds height * width * 3 bytes. */
static int decode(const unsigned char *data, unsigned long size, int factor, int top, int left, int height,
                  int width, int fast_upsample, unsigned char *out, ErrorManager *err, int *bad_box) {
    struct jpeg_decompress_struct cinfo;
    /* Set after setjmp and freed after a longjmp: volatile, or the jump may restore stale copies. */
    JSAMPARRAY volatile rows = NULL;
    unsigned char *volatile buffer = NULL;
    volatile int status = 1;

    cinfo.err = jpeg_std_error(&err->pub);
    err->pub.error_exit = on_error;
    err->pub.emit_message = on_message;
    err->message[0] = '\0';
    jpeg_create_decompress(&cinfo);
    if (setjmp(err->escape))
        goto finish;  /* libjpeg's error: err->message holds it */
    jpeg_mem_src(&cinfo, data, size);
    jpeg_read_header(&cinfo, TRUE);
    cinfo.out_color_space = JCS_RGB;
    cinfo.scale_num = 1;
    cinfo.scale_denom = (unsigned int)factor;
    cinfo.dct_method = JDCT_ISLOW;
    cinfo.do_fancy_upsampling = fast_upsample ? FALSE : TRUE;
    jpeg_start_decompress(&cinfo);
    if (top < 0 || left < 0 || height <= 0 || width <= 0 ||
        (JDIMENSION)(top + height) > cinfo.output_height || (JDIMENSION)(left + width) > cinfo.output_width) {
        snprintf(err->message, sizeof(err->message), "box (top %d, left %d, %dx%d) outside the %ux%u image",
                 top, left, height, width, cinfo.output_height, cinfo.output_width);
        *bad_box = 1;
        goto finish;
    }
    /* One column more on each side where there is one: crop_scanline widens the columns to iMCU boundaries,
     * and the columns at such a boundary are upsampled as image edges, which they are not. */
    JDIMENSION x = left > 0 ? (JDIMENSION)left - 1 : 0;
    JDIMENSION right = (JDIMENSION)(left + width) < cinfo.output_width ? (JDIMENSION)(left + width) + 1
                                                                      : cinfo.output_width;
    JDIMENSION span = right - x;
    if (x > 0 || span < cinfo.output_width)
        jpeg_crop_scanline(&cinfo, &x, &span);
    /* Whole iMCU rows above the crop are skipped; the rows of its first iMCU row that lie above it are decoded
     * with the crop and dropped (libjpeg would skip them by decoding row by row into a scratch row, slower). */
#if JPEG_LIB_VERSION >= 70
    int imcu_rows = cinfo.max_v_samp_factor * cinfo.min_DCT_v_scaled_size;
#else
    int imcu_rows = cinfo.max_v_samp_factor * cinfo.min_DCT_scaled_size;
#endif
    int skip = imcu_rows > 0 ? top / imcu_rows * imcu_rows : top;
    int lead = top - skip, total = lead + height;
    size_t offset = (size_t)(left - (int)x) * 3, row_bytes = (size_t)width * 3;
    size_t stride = (size_t)cinfo.output_width * 3;  /* output_width is the cropped span now */
    /* All rows are asked for in one call, as TurboJPEG does: asked for fewer rows than the upsampler makes at a
     * time, libjpeg goes through a spare row (measured ~20% slower on 4:2:0 files). Where the span is the crop,
     * libjpeg writes straight into `out`. */
    int direct = lead == 0 && offset == 0 && stride == row_bytes;
    rows = malloc(sizeof(JSAMPROW) * (size_t)total);
    buffer = direct ? NULL : malloc(stride * (size_t)total);
    if (rows == NULL || (!direct && buffer == NULL)) {
        snprintf(err->message, sizeof(err->message), "out of memory");
        goto finish;
    }
    for (int i = 0; i < total; i++)
        rows[i] = direct ? out + row_bytes * (size_t)i : buffer + stride * (size_t)i;
    if (skip > 0 && jpeg_skip_scanlines(&cinfo, (JDIMENSION)skip) != (JDIMENSION)skip) {
        snprintf(err->message, sizeof(err->message), "could not skip to row %d", skip);
        goto finish;
    }
    int done = 0;
    while (done < total) {
        JDIMENSION got = jpeg_read_scanlines(&cinfo, rows + done, (JDIMENSION)(total - done));
        if (got == 0)
            break;
        done += (int)got;
    }
    if (!direct)
        for (int i = lead; i < done; i++)
            memcpy(out + row_bytes * (size_t)(i - lead), rows[i] + offset, row_bytes);
    if (done < total)
        snprintf(err->message, sizeof(err->message), "the image data ended at row %d", skip + done);
    else if (err->pub.num_warnings == 0)
        status = 0;  /* else the message holds the first warning */
finish:
    free(rows);
    free(buffer);
    jpeg_destroy_decompress(&cinfo);  /* also where the crop ends above the image's end: the rest is never decoded */
    return status;
}

static PyObject *decode_region(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"data", "factor", "top", "left", "height", "width", "fast_upsample", NULL};
    Py_buffer data;
    int factor, top, left, height, width, fast_upsample = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*iiiii|p", keywords, &data, &factor, &top, &left, &height,
                                     &width, &fast_upsample))
        return NULL;
    if (factor != 1 && factor != 2 && factor != 4 && factor != 8) {
        PyBuffer_Release(&data);
        return PyErr_Format(PyExc_ValueError, "factor must be 1, 2, 4 or 8, got %d", factor);
    }
    if (height <= 0 || width <= 0 || (size_t)height * (size_t)width > ((size_t)1 << 40)) {
        PyBuffer_Release(&data);
        return PyErr_Format(PyExc_ValueError, "bad box size %dx%d", height, width);
    }
    PyObject *result = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)height * width * 3);
    if (result == NULL) {
        PyBuffer_Release(&data);
        return NULL;
    }
    ErrorManager err;
    int bad_box = 0, status;
    unsigned char *out = (unsigned char *)PyByteArray_AS_STRING(result);
    Py_BEGIN_ALLOW_THREADS
    status = decode((const unsigned char *)data.buf, (unsigned long)data.len, factor, top, left, height, width,
                    fast_upsample, out, &err, &bad_box);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    if (status != 0) {
        Py_DECREF(result);
        return PyErr_Format(bad_box ? PyExc_IndexError : PyExc_ValueError, "%s", err.message);
    }
    return result;
}

static PyMethodDef methods[] = {
    {"decode_region", (PyCFunction)(void (*)(void))decode_region, METH_VARARGS | METH_KEYWORDS,
     "decode_region(data, factor, top, left, height, width, fast_upsample=False) -> bytearray\n\n"
     "The RGB pixels (height x width x 3, row-major) of one box of a JPEG decoded at 1/factor scale; only\n"
     "that box is inverse-transformed, and nothing below it is decoded."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpeg_region",
                                    "Region-of-interest JPEG decoding with libjpeg-turbo.", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__jpeg_region(void) {
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "LIBJPEG_TURBO_VERSION", LIBJPEG_TURBO_VERSION_NUMBER) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
