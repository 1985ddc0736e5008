// Compare: rows are the stages in forward order, columns the chosen steps (of run A and,
// beside it, run B). A grid cell is an <img> of the logged PNG, its bytes unchanged; a
// map cell is drawn here, the stage's stored map over the probe image, at full size.
import * as api from './api.js';
import {el, select, short} from './dom.js';

const METRIC = /map|loss|acc|top-?[15]|fitness|f1/i;
const MAX_METRICS = 4;

export async function renderCompare(app, main) {
  const s = app.state;
  const runs = [s.run, s.runB].filter(Boolean);
  const infos = await Promise.all(runs.map((r) => app.info(r)));
  main.append(controls(app, infos[0]));
  const steps = app.steps;
  const shown = (o) => infos.some((info) => info.grids.includes(o.base) || info.maps.includes(o.base));
  const outputs = infos[0].outputs.filter((o) => shown(o)
    && (!app.stages.length || app.stages.includes(o.base)));
  const columns = steps.flatMap((step) => runs.map((run, k) => ({run, info: infos[k], step})));
  const table = el('div', {class: 'compare', id: 'compare',
    style: {gridTemplateColumns: `minmax(11em, max-content) repeat(${columns.length}, minmax(0, 1fr))`}});
  table.append(el('div', {class: 'corner'}, runs.length > 1 ? `A: ${runs[0]}  ·  B: ${runs[1]}` : ''));
  for (const col of columns) table.append(header(col, runs));
  const drawn = [];
  for (const output of outputs) {
    table.append(rowLabel(app, output, steps));
    for (const col of columns) {
      const cell = el('div', {class: 'cell', dataset: {run: col.run, base: output.base, step: col.step}});
      drawn.push(fillCell(app, cell, col, output.base));
      table.append(cell);
    }
  }
  main.append(table);
  await Promise.allSettled(drawn);
}

function controls(app, info) {
  const s = app.state;
  const all = info.steps.all;
  const picker = el('input', {type: 'range', id: 'step-slider', min: 0, max: all.length - 1,
    value: Math.max(0, all.indexOf(app.steps[app.steps.length - 1] ?? all[0]))});
  const field = el('input', {type: 'number', id: 'step-field', value: all[picker.value],
    min: all[0], max: all[all.length - 1]});
  picker.addEventListener('input', () => { field.value = all[picker.value]; });
  const add = () => {
    const step = Number(field.value);
    if (all.includes(step)) app.set({steps: [...app.steps, step].join(',')});
    else field.setCustomValidity(`step ${step} was not logged`), field.reportValidity();
  };
  const stages = [['', 'all stages'], ...info.outputs.map((o) => [o.base, o.base])];
  if (app.stages.length > 1) stages.push([app.state.stages, `${app.stages.length} stages`]);
  return el('div', {class: 'controls'},
    el('span', {class: 'group', id: 'modes'}, ['grid', 'cam', 'both'].map((m) => el('button', {
      class: m === s.mode ? 'mode active' : 'mode', dataset: {mode: m},
      onclick: () => app.set({mode: m}),
    }, {grid: 'Grid', cam: 'CAM', both: 'Both'}[m]))),
    el('label', {}, 'map opacity ', el('input', {type: 'range', id: 'alpha', min: 0, max: 1,
      step: 0.05, value: s.alpha, onchange: (e) => app.set({alpha: e.target.value})})),
    el('label', {}, 'stages ', select(stages, app.state.stages || '',
      (stage) => app.set({stages: stage}), {id: 'stages'})),
    el('span', {class: 'group', id: 'steps'}, 'steps ', app.steps.map((step) => el('button', {
      class: 'chip', dataset: {step}, title: 'remove this column',
      onclick: () => app.set({steps: app.steps.filter((t) => t !== step).join(',')}),
    }, `${step} ×`))),
    el('span', {class: 'group'}, picker, field,
      el('button', {id: 'add-step', onclick: add}, 'add step')),
    el('span', {class: 'hint'}, '←/→ move the columns'),
  );
}

function header(col, runs) {
  const shown = Object.entries(col.info.metrics).filter(([tag]) => METRIC.test(tag))
    .slice(0, MAX_METRICS);
  // a metric's last name, or its whole tag where two share one (train/loss, eval/loss)
  const last = (tag) => tag.split('/').pop();
  const shared = (tag) => shown.filter(([other]) => last(other) === last(tag)).length > 1;
  const metrics = shown.map(([tag, values]) => {
    const found = values.find(([step]) => step === col.step);
    return found ? el('span', {class: 'metric', title: tag},
      `${shared(tag) ? tag : last(tag)} ${short(found[1])}`) : null;
  });
  return el('div', {class: 'head', dataset: {run: col.run, step: col.step}},
    el('b', {}, `step ${col.step}`), runs.length > 1 ? ` · ${col.run === runs[0] ? 'A' : 'B'}` : '',
    el('div', {class: 'metrics'}, metrics));
}

function rowLabel(app, output, steps) {
  const {run, image, mode} = app.state;
  const [index, ...rest] = output.base.split('_');
  const shape = output.shape.length ? output.shape.join('×') : '';
  const info = app.infos.get(run);
  const kinds = (mode === 'both' ? ['features', 'cam'] : [mode === 'cam' ? 'cam' : 'features'])
    .filter((kind) => (kind === 'cam' ? info.maps : info.grids).includes(output.base));
  return el('div', {class: 'label', dataset: {base: output.base}},
    el('b', {}, index), ' ', rest.join('_'),
    el('div', {class: 'type'}, [output.type, shape].filter(Boolean).join(' · ')),
    el('div', {class: 'downloads'}, kinds.map((kind) => el('a', {
      class: 'download', dataset: {kind}, download: true,
      href: api.figureUrl(run, kind, output.base, image, steps),
      title: 'the figure tbfeat export draws of this row',
    }, kind === 'cam' ? '⤓ maps' : '⤓ grids'))));
}

function fillCell(app, cell, col, base) {
  const {image, mode} = app.state;
  const jobs = [];
  if (mode !== 'cam') jobs.push(gridImage(app, cell, col, base, image));
  if (mode !== 'grid') jobs.push(camCanvas(app, cell, col, base, image));
  return Promise.allSettled(jobs);
}

function missing(cell, what) {
  cell.append(el('div', {class: 'missing'}, what));
}

function gridImage(app, cell, col, base, image) {
  const tag = api.tags.features(base, image);
  if (!col.info.grids.includes(base) || !col.info.steps.features.includes(col.step)) {
    missing(cell, 'no grid');
    return Promise.resolve();
  }
  const img = el('img', {class: 'grid', alt: `${tag} at step ${col.step}`,
    dataset: {run: col.run, tag, step: col.step}});
  cell.append(img);
  img.addEventListener('click', (e) => openChannel(app, img, e, col, base));
  return new Promise((resolve) => {
    img.onload = resolve;
    img.onerror = () => { img.replaceWith(el('div', {class: 'missing'}, 'not logged')); resolve(); };
    img.src = api.imageUrl(col.run, tag, col.step);
  });
}

// A click on a tile opens that channel of the stage at every step.
function openChannel(app, img, e, col, base) {
  const layout = [...col.info.layouts].reverse().find((l) => l.step <= col.step);
  const grid = layout && layout.grids[base];
  if (!grid) return;
  const [th, tw] = grid.tile;
  const x = Math.floor(e.offsetX * img.naturalWidth / img.clientWidth);
  const y = Math.floor(e.offsetY * img.naturalHeight / img.clientHeight);
  if (x % (tw + 1) >= tw || y % (th + 1) >= th) return;  // a separator
  const i = Math.floor(y / (th + 1)) * grid.ncols + Math.floor(x / (tw + 1));
  if (Math.floor(x / (tw + 1)) >= grid.ncols || i >= grid.channels.length) return;
  app.set({view: 'channel', run: col.run, stage: base, channel: grid.channels[i]});
}

// The map drawn over the probe image the model saw at that step (the latest input/
// picture up to it), at the picture's size; a run logged before maps were stored as
// maps has overlays already: they are shown as they are.
async function camCanvas(app, cell, col, base, image) {
  const tag = api.tags.cam(base, image);
  if (!col.info.maps.includes(base) || !col.info.steps.cam.includes(col.step)) {
    missing(cell, 'no map');
    return;
  }
  const inputs = (col.info.inputs[image] || []).filter((t) => t <= col.step);
  const canvas = el('canvas', {class: 'cam', dataset: {run: col.run, tag, step: col.step}});
  cell.append(canvas);
  try {
    const map = await api.loadImage(api.imageUrl(col.run, tag, col.step));
    const picture = inputs.length
      ? await api.loadImage(api.imageUrl(col.run, api.tags.input(image), inputs[inputs.length - 1]))
      : null;
    const [w, h] = picture ? [picture.naturalWidth, picture.naturalHeight]
      : [map.naturalWidth, map.naturalHeight];
    canvas.width = w;
    canvas.height = h;
    const ctx = canvas.getContext('2d');
    if (picture) ctx.drawImage(picture, 0, 0);
    ctx.globalAlpha = picture ? Number(app.state.alpha) : 1;
    ctx.imageSmoothingEnabled = true;
    ctx.imageSmoothingQuality = 'high';
    ctx.drawImage(map, 0, 0, w, h);
    canvas.dataset.drawn = inputs.length ? `input@${inputs[inputs.length - 1]}` : 'as logged';
  } catch (e) {
    canvas.replaceWith(el('div', {class: 'missing'}, 'not logged'));
  }
}
