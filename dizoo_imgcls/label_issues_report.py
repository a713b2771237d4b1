"""Reports of a label-issue ranking: a CSV of every image, an HTML page and a TensorBoard grid of the top N."""
import base64
import csv
import html
import io
import os
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image

from .data import load_rgb
from .data.folder import is_within, same_file
from .errors import SettingError
from .label_issues import LabelIssue
from .tb_visuals import image_grid

CSV_NAME = 'label_issues.csv'
HTML_NAME = 'label_issues.html'
CSV_HEADER = ('rank', 'path', 'given_label', 'suggested_label', 'score', 'flagged')
TB_TAG = 'label_issues/most_likely_mislabeled'
THUMBNAIL_PX = 112  # side of the square thumbnails in the HTML page and the TensorBoard grid
TB_GRID_IMAGES = 32  # TensorBoard shows the first of the top N: one grid, still legible


def check_outputs(out_dir: str, data_root: str, split: str, checkpoint: Optional[str] = None) -> None:
    """Refuse an ``out_dir`` whose writing would change the inputs: inside ``data_root``'s split being checked,
    or its train/ or val/ (the reports and fold runs would become a class folder of the data), or a CSV or HTML
    report that is the checkpoint itself. Links and other spellings of a path are resolved. Raises ``ValueError``."""
    for name in dict.fromkeys((split, 'train', 'val')):
        data_dir = os.path.join(data_root, name)
        if os.path.isdir(data_dir) and is_within(out_dir, data_dir):
            raise SettingError(f'--out-dir {out_dir} lies inside the data folder {data_dir}: the reports and fold runs '
                               'would become a class folder of it; choose a folder outside it')
    if checkpoint is not None:
        for name in (CSV_NAME, HTML_NAME):
            if same_file(os.path.join(out_dir, name), checkpoint):
                raise SettingError(f'--out-dir {out_dir} would write {name} over the checkpoint {checkpoint}; choose '
                                   'another --out-dir')


def write_csv(path: str, issues: Sequence[LabelIssue]) -> None:
    """Every ranked image, most likely mislabeled first; ``score`` is the predicted probability of the given
    label, ``flagged`` is cleanlab's verdict."""
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(CSV_HEADER)
        for rank, issue in enumerate(issues, 1):
            writer.writerow([rank, issue.path, issue.given, issue.suggested, f'{issue.score:.6f}',
                             int(issue.flagged)])


def square_thumbnail(path: str, size_px: int = THUMBNAIL_PX) -> Optional[np.ndarray]:
    """The center square of an image file, resized to ``size_px``, as an HWC uint8 array; None if unreadable."""
    try:
        image = load_rgb(path, draft_size=size_px)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    square = image.crop((left, top, left + side, top + side)).resize((size_px, size_px), Image.BILINEAR)
    return np.asarray(square)


def _data_uri(thumbnail: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(thumbnail).save(buffer, format='JPEG', quality=85)
    return 'data:image/jpeg;base64,' + base64.b64encode(buffer.getvalue()).decode('ascii')


_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Likely label issues: {source}</title>
<style>body{{font-family:sans-serif}} td,th{{padding:4px 8px;border-bottom:1px solid #ddd;text-align:left}}
td.path{{font-family:monospace;font-size:small}} tr.flagged{{background:#fff3f0}}</style></head>
<body><h1>Likely label issues</h1>
<p>{source}: the {shown} images whose given label the out-of-sample model believes least, of {total}
(cleanlab flags {flagged}). Score: predicted probability of the given label.</p>
<table><tr><th>#</th><th>image</th><th>given</th><th>suggested</th><th>score</th><th>flagged</th>
<th>path</th></tr>
{rows}
</table></body></html>
"""


def write_html(path: str, issues: Sequence[LabelIssue], top_n: int, source: str) -> None:
    """A self-contained page (base64 thumbnails) of the ``top_n`` most likely mislabeled images."""
    rows = []
    for rank, issue in enumerate(issues[:top_n], 1):
        thumbnail = square_thumbnail(issue.path)
        image = f'<img src="{_data_uri(thumbnail)}" width="{THUMBNAIL_PX}">' if thumbnail is not None \
            else 'unreadable'
        rows.append(f'<tr class="{"flagged" if issue.flagged else ""}"><td>{rank}</td><td>{image}</td>'
                    f'<td>{html.escape(issue.given)}</td><td>{html.escape(issue.suggested)}</td>'
                    f'<td>{issue.score:.3f}</td><td>{"yes" if issue.flagged else ""}</td>'
                    f'<td class="path">{html.escape(issue.path)}</td></tr>')
    page = _PAGE.format(source=html.escape(source), shown=min(top_n, len(issues)), total=len(issues),
                        flagged=sum(issue.flagged for issue in issues), rows='\n'.join(rows))
    with open(path, 'w', encoding='utf-8') as f:
        f.write(page)


def write_tensorboard(log_dir: str, issues: Sequence[LabelIssue], top_n: int) -> None:
    """One captioned grid ("given -> suggested (score)") of the first ``min(top_n, TB_GRID_IMAGES)`` images; the
    event files of an earlier report in ``log_dir`` are removed first."""
    from tensorboardX import SummaryWriter

    if os.path.isdir(log_dir):  # a re-run into the same folder replaces the grid instead of adding a second one
        for name in os.listdir(log_dir):
            if name.startswith('events.out.tfevents'):
                os.remove(os.path.join(log_dir, name))
    images, captions = [], []
    for issue in issues[:min(top_n, TB_GRID_IMAGES)]:
        thumbnail = square_thumbnail(issue.path)
        if thumbnail is not None:
            images.append(thumbnail)
            captions.append(f'{issue.given} ->\n{issue.suggested} ({issue.score:.2f})')
    if not images:
        return
    with SummaryWriter(log_dir) as writer:
        writer.add_image(TB_TAG, image_grid(images, captions, columns=8, tile_px=THUMBNAIL_PX), 0,
                         dataformats='HWC')


def write_reports(out_dir: str, issues: Sequence[LabelIssue], top_n: int, source: str) -> List[str]:
    """CSV, HTML and TensorBoard reports under ``out_dir``; returns their paths (the TensorBoard folder last)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, CSV_NAME), os.path.join(out_dir, HTML_NAME), os.path.join(out_dir, 'tb')]
    write_csv(paths[0], issues)
    write_html(paths[1], issues, top_n, source)
    write_tensorboard(paths[2], issues, top_n)
    return paths
