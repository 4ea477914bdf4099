// Screenshot a local HTML page (`dvc plots diff ... -o DIR` writes DIR/index.html) in headless Chromium.
//   npm install --prefix /tmp/shot @sparticuz/chromium@131 puppeteer-core@23   (Chromium ships in the package)
//   NODE_PATH=/tmp/shot/node_modules node bench/screenshot.js /abs/path/index.html out.png [width, default 1400]
// DVC's page loads vega from a CDN; offline, point its three <script> tags at local copies first
// (`npm pack vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2`, build/*.min.js): docs/workflow.md.
const chromium = require('@sparticuz/chromium');
const puppeteer = require('puppeteer-core');

(async () => {
  const [pagePath, out, width] = process.argv.slice(2);
  if (!pagePath || !out) {
    console.error('error: usage: node bench/screenshot.js PAGE.html OUT.png [WIDTH]');
    process.exit(2);
  }
  const browser = await puppeteer.launch({args: chromium.args, executablePath: await chromium.executablePath(),
                                          headless: chromium.headless});
  const page = await browser.newPage();
  await page.setViewport({width: parseInt(width || '1400', 10), height: 900});
  await page.goto('file://' + pagePath, {waitUntil: 'networkidle0'});
  await new Promise((resolve) => setTimeout(resolve, 1500));  // vega-embed draws after the load event
  const charts = await page.evaluate(() => document.querySelectorAll('.vega-embed').length);
  const images = await page.evaluate(() => document.querySelectorAll('img').length);
  console.log(`${charts} charts, ${images} images`);
  await page.screenshot({path: out, fullPage: true});
  await browser.close();
})().catch((err) => { console.error(`error: ${err.message}`); process.exit(1); });
